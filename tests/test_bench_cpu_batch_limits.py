"""benchmarks/cpu_batch_limits.py --smoke: every setting runs the same requests, and the choice follows the
rule (highest throughput within the TPOT SLO)."""

from benchmarks import cpu_batch_limits


def test_batch_limits_smoke(capsys):
    results = cpu_batch_limits.main(["--smoke", "--tpot-slo-ms", "1e9"])
    rows = results["rows"]
    assert [(r["max_num_seqs"], r["max_num_batched_tokens"]) for r in rows] == [(4, 512), (8, 512)]
    assert all(r["output_tok_s"] > 0 and r["tpot_p50_ms"] > 0 for r in rows)
    best = max(rows, key=lambda r: r["output_tok_s"])
    assert results["chosen"] == {"max_num_seqs": best["max_num_seqs"], "max_num_batched_tokens": 512}
    assert "(chosen)" in capsys.readouterr().out
