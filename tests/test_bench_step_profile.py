"""benchmarks/step_profile.py --smoke: a small decode run profiles every phase, counts the sampler's device
-> host copies, and prints the table."""

from benchmarks import step_profile


def test_step_profile_smoke(capsys):
    results = step_profile.main(["--smoke", "--threads", "1"])
    [run] = results["runs"].values()
    assert run["timed_steps"] == run["spec"]["steps"]
    assert set(run["phases_ms"]) == set(step_profile.PHASES)
    assert all(run["phases_ms"][p] > 0 for p in ("schedule", "prepare", "forward", "sample", "output"))
    assert run["wall_s"] > 0 and run["tokens_per_s"] > 0
    assert run["d2h_bytes_by_phase"]["sample"] > 0  # the sampled ids reach the host
    assert run["largest_transfer_elements"] < run["vocab_size"]  # no row of logits does
    out = capsys.readouterr().out
    assert "| tiny-mixed-b8 |" in out and "D2H bytes/step" in out
