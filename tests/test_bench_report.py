"""Serving-benchmark reporting: ours/baseline ratios and targets, summary.md, and RESULTS.md sections that
replace only their own text and keep the offline section (which its script appends to) last."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench.report import OFFLINE_HEADING, replace_section, summary_markdown
from benchmarks.bench.runner import SuiteRun, check_targets, ratios
from benchmarks.bench.suite import parse_suite

SUITE = parse_suite(
    {
        "suite": "t",
        "profile": "cpu",
        "workloads": [{"name": "w", "concurrency": [16]}],
        "targets": [
            {"workload": "w", "load": "c16", "metric": "output_throughput", "at_least": 1.0},
            {"workload": "w", "load": "c16", "metric": "median_ttft_ms", "at_most": 1.0},
        ],
    }
)


def result(label: str, out_tps: float, ttft: float, failed: int = 0) -> dict:
    return {
        "label": label, "engine_backend": "native" if label == "glm-serve" else "vllm", "workload": {"name": "w"},
        "load_point": "c16", "request_rate": "inf", "max_concurrency": 16, "completed": 32 - failed, "failed": failed,
        "request_throughput": out_tps / 32, "output_throughput": out_tps, "total_token_throughput": out_tps * 9,
        "request_goodput": None, "median_ttft_ms": ttft, "p90_ttft_ms": ttft * 2, "p99_ttft_ms": ttft * 3,
        "median_tpot_ms": 50.0, "p90_tpot_ms": 60.0, "p99_tpot_ms": 70.0, "median_itl_ms": 40.0,
        "median_e2el_ms": 2000.0, "error_counts": {"HTTP 503: busy": failed} if failed else {},
        "server_argv": ["python", "-m", label], "server_env": {}, "server_startup_s": 3.0,
        "commit": "abc1234", "machine": {"cpu": "AMD EPYC", "cpu_count": 2, "load_average_at_start": [1.0, 2.0, 3.0]},
        "tokenizer_id": "/m/SmolLM2", "note": "shared host",
    }  # fmt: skip


def test_ratios_and_targets():
    run = SuiteRun(SUITE, Path("/tmp/x"), [result("glm-serve", 120.0, 300.0), result("vllm", 100.0, 400.0)])
    table = ratios(run)
    row = table["vllm"]["w c16"]
    assert row["output_throughput"] == pytest.approx(1.2)
    assert row["median_ttft_ms"] == pytest.approx(0.75)
    assert row["median_tpot_ms"] == pytest.approx(1.0)
    assert "request_goodput" not in row  # null on both sides: no ratio
    checks = check_targets(run, table)
    assert [c["met"] for c in checks] == [True, True]
    slower = SuiteRun(SUITE, Path("/tmp/x"), [result("glm-serve", 90.0, 500.0), result("vllm", 100.0, 400.0)])
    assert [c["met"] for c in check_targets(slower, ratios(slower))] == [False, False]
    alone = SuiteRun(SUITE, Path("/tmp/x"), [result("glm-serve", 90.0, 500.0)])
    assert ratios(alone) == {} and check_targets(alone, {}) == []


def test_summary_lists_servers_results_ratios_targets_and_errors():
    run = SuiteRun(
        SUITE,
        Path("/tmp/20260101-000000"),
        [result("glm-serve", 120.0, 300.0, failed=2), result("vllm", 100.0, 400.0)],
    )
    run.notes.append("vLLM baseline skipped")
    table = ratios(run)
    text = summary_markdown(
        run, table, check_targets(run, table), [Path("/tmp/w_concurrency_ttft.png")], "figures/t/"
    )
    assert "commit `abc1234`" in text and "AMD EPYC" in text and "note: shared host" in text
    assert "| w | c16 | glm-serve | 30/2 |" in text and "| w | c16 | vllm | 32/0 |" in text
    assert "| w c16 | 1.20x |" in text
    assert "output_throughput at w c16: ours/baseline >= 1 vs vllm: 1.20x, met" in text
    assert "glm-serve w c16: {'HTTP 503: busy': 2}" in text
    assert "![w_concurrency_ttft](figures/t/w_concurrency_ttft.png)" in text
    assert "- vLLM baseline skipped" in text


def test_results_md_sections_keep_other_content(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\nintro\n\n{OFFLINE_HEADING} (x)\n\n| old line |\n")
    replace_section(md, "serve-bench:cpu", "first run")
    text = md.read_text()
    assert (
        text.index("first run") < text.index(OFFLINE_HEADING) and "intro" in text and "| old line |" in text
    )
    replace_section(md, "serve-bench:cpu", "second run")
    replace_section(md, "frontend-overhead", "overhead")
    text = md.read_text()
    assert "first run" not in text and text.count("second run") == 1 and "overhead" in text
    assert text.rstrip().endswith("| old line |")  # the offline script appends here
    fresh = tmp_path / "NEW.md"
    replace_section(fresh, "serve-bench:cpu", "run")
    assert fresh.read_text().index("run") < fresh.read_text().index(OFFLINE_HEADING)
