"""benchmarks/spec_decode.py --smoke: both engines run the copy workload, outputs are identical, the ngram
drafter's tokens are accepted, the off-switch run (random prompts above disable_by_batch_size) runs, and
the table names every run."""

from benchmarks import spec_decode


def test_spec_decode_benchmark_smoke(capsys):
    results = spec_decode.main(["--smoke", "--threads", "2"])
    assert set(results["runs"]) == {"1", "2"}
    for run in results["runs"].values():
        assert run["outputs_identical"] == "2/2"
        assert run["native"]["output_tokens"] == run["native_ngram"]["output_tokens"] > 0
        assert run["native_ngram"]["acceptance_rate"] > 0
        assert run["ngram_vs_plain_tok_s"] > 0 and run["plain_vs_ngram_tpot"] > 0
    off_switch = results["random"]  # plain and ngram with disable_by_batch_size on the same requests
    assert off_switch["concurrency"] == 4 and off_switch["speculative_config"]["disable_by_batch_size"] == 2
    assert off_switch["native"]["output_tokens"] == off_switch["native_ngram"]["output_tokens"] == 4 * 16
    out = capsys.readouterr().out
    assert "| 2 | native_ngram |" in out and "ngram vs plain" in out
