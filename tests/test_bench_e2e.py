"""The serving benchmark end to end: `serve_bench.main --suite` starts a real `python -m server.cli serve`
(native engine, SmolLM2 on CPU), sends short streamed completions and chat requests through it, stops it,
and writes results (vLLM's field names plus machine/commit/profile), plots and summary.md. The vLLM
baseline is reported as skipped when its venv is absent, and the run still passes."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import serve_bench
from benchmarks.bench.servers import ServerSpec

SUITE = """
suite: e2e
profile: cpu
api: completions
ignore_eos: true
goodput: {ttft: 120000, tpot: 60000}
workloads:
  - {name: completions, dataset: random, input_len: 24, output_len: 6, concurrency: [1, 2], num_prompts: 2, num_warmups: 0}
  - {name: chat, dataset: shared_prefix, api: chat, prefix_len: 40, suffix_len: 8, output_len: 5,
     request_rate: [20], num_prompts: 2, num_warmups: 0}
"""


@pytest.mark.slow
def test_suite_against_a_real_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve_bench, "vllm_available", lambda: False)  # as in CI: no .venv-vllm
    started: list[ServerSpec] = []
    real_spec = serve_bench.glm_serve_spec
    monkeypatch.setattr(
        serve_bench, "glm_serve_spec", lambda *a, **k: started.append(real_spec(*a, **k)) or started[-1]
    )
    suite = tmp_path / "e2e.yaml"
    suite.write_text(SUITE)
    rc = serve_bench.main(
        ["--suite", str(suite), "--baseline", "vllm", "--out", str(tmp_path / "results"), "--note", "test"]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert "vLLM baseline skipped: .venv-vllm not found" in printed.out
    assert started and started[0].argv[1:4] == ["-m", "server.cli", "serve"]

    run_dir = next((tmp_path / "results" / "e2e").iterdir())
    results = json.loads((run_dir / "results.json").read_text())["results"]
    by_name = {(r["workload"]["name"], r["load_point"]): r for r in results}
    assert [by_name["completions", p]["completed"] for p in ("c1", "c2")] == [2, 2]  # 4 short requests
    done = by_name["completions", "c2"]
    assert (done["completed"], done["failed"], done["num_prompts"], done["max_concurrency"]) == (2, 0, 2, 2)
    assert (
        done["endpoint_type"] == "openai"
        and done["label"] == "glm-serve"
        and done["engine_backend"] == "native"
    )
    assert (
        done["profile"] == "cpu"
        and done["commit"]
        and done["machine"]["cpu"]
        and done["machine"]["cpu_count"]
    )
    assert done["total_output_tokens"] == 2 * 6  # ignore_eos: exactly max_tokens each
    assert done["total_input_tokens"] >= 2 * 18  # the server's own count of the prompt tokens
    assert 0 < done["median_ttft_ms"] <= done["median_e2el_ms"] and done["median_tpot_ms"] > 0
    assert done["request_goodput"] == pytest.approx(done["request_throughput"])  # generous SLOs: all good
    assert done["max_concurrent_requests"] >= 1 and done["output_throughput"] > 0

    chat = by_name["chat", "r20"]
    assert (chat["completed"], chat["failed"], chat["endpoint_type"], chat["request_rate"]) == (
        2,
        0,
        "openai-chat",
        20.0,
    )
    assert chat["total_input_tokens"] > 2 * 48  # the system prompt and the template are counted

    per_run = sorted(p.name for p in run_dir.glob("glm-serve__*.json"))
    assert per_run == [
        "glm-serve__chat__r20.json",
        "glm-serve__completions__c1.json",
        "glm-serve__completions__c2.json",
    ]
    if importlib.util.find_spec("matplotlib") is not None:  # plots are skipped, with a note, without it
        pngs = {p.name for p in run_dir.glob("*.png")}
        expected = {f"completions_concurrency_{kind}.png" for kind in ("throughput", "ttft", "tpot")}
        assert pngs == expected  # the chat workload has one load point: a table, no plot
    summary = (run_dir / "summary.md").read_text()
    assert "| completions | c2 | glm-serve | 2/0 |" in summary and "vLLM baseline skipped" in summary
    assert (run_dir / "server-glm-serve.log").exists()
