"""Serving-benchmark metric math on synthetic timings, against values computed by hand; the SSE timer on
synthetic streams; vLLM's `bench serve` field names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.bench.client import Endpoint, RequestOutput, StreamTimer, build_payload
from benchmarks.bench.datasets import SampleRequest
from benchmarks.bench.metrics import (
    DETAIL_FIELDS,
    SUMMARY_FIELDS,
    compute_metrics,
    detail_lists,
    error_summary,
    latency_fields,
    parse_goodput,
    percentile_key,
)

ROOT = Path(__file__).resolve().parent.parent


def outputs() -> list[RequestOutput]:
    """A: 4 tokens, TTFT 100 ms, gaps 20/30/50 ms -> E2EL 200 ms, TPOT (200-100)/3 = 33.3 ms.
    B: 2 tokens, TTFT 300 ms, gap 100 ms -> E2EL 400 ms, TPOT 100 ms.
    C: 1 token, TTFT = E2EL = 200 ms, no TPOT (counts as 0 for goodput). D: failed."""
    a = RequestOutput(True, 10, 4, 0.1, [0.02, 0.03, 0.05], 0.2, 0.0)
    b = RequestOutput(True, 20, 2, 0.3, [0.1], 0.4, 0.05)
    c = RequestOutput(True, 5, 1, 0.2, [], 0.2, 1.5)
    d = RequestOutput(False, 7, 0, 0.0, [], 0.01, 0.2, error="HTTP 503: overloaded\nmore")
    return [a, b, c, d]


def test_counts_and_throughputs():
    m = compute_metrics(outputs(), duration_s=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 35, 7)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(21.0)
    assert m["request_goodput"] is None  # no SLO given


def test_ttft_and_e2el_percentiles():
    m = compute_metrics(outputs(), 2.0)
    # TTFT ms: 100, 300, 200 -> sorted 100, 200, 300; p90 at rank 1.8: 200 + 0.8 * 100.
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt(20000 / 3))
    assert m["p50_ttft_ms"] == pytest.approx(200.0)
    assert m["p90_ttft_ms"] == pytest.approx(280.0)
    assert m["p99_ttft_ms"] == pytest.approx(298.0)
    # E2EL ms: 200, 400, 200 -> sorted 200, 200, 400.
    assert m["mean_e2el_ms"] == pytest.approx(800 / 3)
    assert m["median_e2el_ms"] == pytest.approx(200.0)
    assert m["p90_e2el_ms"] == pytest.approx(360.0)


def test_tpot_excludes_the_first_token_and_one_token_requests():
    m = compute_metrics(outputs(), 2.0)
    # A: (200 - 100) / (4 - 1) = 33.33 ms; B: (400 - 300) / 1 = 100 ms; C has one token: left out.
    assert m["mean_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    assert m["median_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    assert m["p90_tpot_ms"] == pytest.approx(100 / 3 + 0.9 * (100 - 100 / 3))


def test_itl_pools_every_gap():
    m = compute_metrics(outputs(), 2.0)
    # gaps ms: 20, 30, 50, 100; p90 at rank 2.7: 50 + 0.7 * 50; p99 at 2.97.
    assert m["mean_itl_ms"] == pytest.approx(50.0)
    assert m["median_itl_ms"] == pytest.approx(40.0)
    assert m["p90_itl_ms"] == pytest.approx(85.0)
    assert m["p99_itl_ms"] == pytest.approx(98.5)


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        ({"ttft": 250, "tpot": 50}, 2),  # A (100, 33) and C (200, tpot 0); B's TTFT 300 misses
        ({"ttft": 300}, 3),  # the bound itself is met
        ({"tpot": 50}, 2),  # B's TPOT 100 misses
        ({"e2el": 150}, 0),
        ({"ttft": 1000, "tpot": 1000, "e2el": 1000}, 3),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slos, good):
    m = compute_metrics(outputs(), 2.0, goodput=slos)
    assert m["request_goodput"] == pytest.approx(good / 2.0)


def test_peaks_bucket_tokens_and_active_requests_by_second():
    m = compute_metrics(outputs(), 2.0)
    # Second 0: A's 4 chunks (0.1 .. 0.2) and B's 2 (0.35, 0.45); second 1: C's one. A and B overlap in 0.
    assert m["max_output_tokens_per_s"] == 6.0
    assert m["max_concurrent_requests"] == 2


def test_no_successful_request_gives_zeros_not_errors():
    m = compute_metrics([outputs()[3]], 1.0, goodput={"ttft": 10})
    assert m["completed"] == 0 and m["failed"] == 1 and m["request_goodput"] == 0
    assert m["mean_ttft_ms"] == 0.0 and m["p99_itl_ms"] == 0.0


def test_parse_goodput_and_percentile_names():
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:10000"]) == {
        "ttft": 500.0,
        "tpot": 50.0,
        "e2el": 10000.0,
    }
    for bad in (["ttft=500"], ["itl:5"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert percentile_key("ttft", 99.0) == "p99_ttft_ms"
    assert percentile_key("itl", 99.9) == "p99.9_itl_ms"


def test_details_and_error_summary():
    details = detail_lists(outputs())
    assert list(details) == list(DETAIL_FIELDS)
    assert details["output_lens"] == [4, 2, 1, 0]
    assert error_summary(outputs()) == {"HTTP 503: overloaded": 1}


# --- the SSE timer ------------------------------------------------------------------------------------


class Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def chat_chunk(content: str | None, finish: str | None = None, role: bool = False) -> str:
    delta = {"role": "assistant", "content": ""} if role else {"content": content}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": None})


def test_timer_ignores_the_role_chunk_and_reads_usage():
    out = RequestOutput(start_time=10.0)
    timer = StreamTimer(out, Clock(10.01, 10.5, 10.6, 10.9, 11.0, 11.1))
    timer.feed(chat_chunk(None, role=True))  # sent before any output: TTFT must not start here
    timer.feed(chat_chunk("Hel"))
    timer.feed(chat_chunk("lo"))
    timer.feed(chat_chunk(" you", finish="length"))
    timer.feed(chat_chunk("", finish="length"))  # finish-only chunk: ends the request, no ITL
    timer.feed(json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}))
    timer.feed("[DONE]")
    timer.finish()
    assert out.success and out.generated_text == "Hello you"
    assert out.ttft == pytest.approx(0.5)
    assert out.itl == pytest.approx([0.1, 0.3])
    assert out.latency == pytest.approx(1.0)  # the finish chunk at 11.0; the usage chunk is not output
    assert (out.prompt_len, out.output_tokens) == (12, 3)


def test_timer_completions_text_and_error_events():
    out = RequestOutput(start_time=0.0)
    timer = StreamTimer(out, Clock(0.2, 0.3))
    timer.feed(json.dumps({"choices": [{"index": 0, "text": "a", "finish_reason": None}]}))
    timer.feed(json.dumps({"error": {"message": "engine died", "type": "InternalServerError"}}))
    timer.finish()
    assert not out.success and out.error == "engine died" and out.ttft == pytest.approx(0.2)


def test_timer_without_output_fails():
    out = RequestOutput(start_time=0.0)
    timer = StreamTimer(out, Clock(0.1, 0.2))
    timer.feed(chat_chunk(None, role=True))
    timer.finish()
    assert not out.success and "no output" in out.error


def test_payloads_as_vllm_sends_them():
    req = SampleRequest("question", 3, 7, system="be brief")
    chat = build_payload(Endpoint("http://h", "m", "chat", ignore_eos=True), req)
    assert chat["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "question"},
    ]
    assert chat["max_completion_tokens"] == 7 and chat["ignore_eos"] is True
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    completion = build_payload(Endpoint("http://h", "m", temperature=None), req)
    assert completion["prompt"] == "be briefquestion" and completion["max_tokens"] == 7
    assert "temperature" not in completion and "ignore_eos" not in completion
    assert Endpoint("http://h/", "m", "chat").url == "http://h/v1/chat/completions"


# --- field names ---------------------------------------------------------------------------------------

# What vLLM's `bench serve` (vllm/benchmarks/serve.py) writes with --save-result and --percentile-metrics
# ttft,tpot,itl,e2el --metric-percentiles 50,90,99: the names existing tooling reads.
VLLM_FIELDS = [
    "date", "endpoint_type", "backend", "model_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
    "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests",
    *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p50", "p90", "p99")),
]  # fmt: skip


def test_result_fields_are_vllms():
    produced = set(SUMMARY_FIELDS) | {f for m in ("ttft", "tpot", "itl", "e2el") for f in latency_fields(m)}
    assert set(VLLM_FIELDS) - {"date", "endpoint_type", "backend", "model_id", "num_prompts", "request_rate",
                               "burstiness", "max_concurrency"} <= produced  # fmt: skip
    m = compute_metrics(outputs(), 2.0)
    assert set(SUMMARY_FIELDS) | {
        f for mm in ("ttft", "tpot", "itl", "e2el") for f in latency_fields(mm)
    } == set(m)


def test_field_names_appear_in_vllms_own_source():
    """Where .venv-vllm exists, check the names against the vLLM that is installed."""
    sources = sorted((ROOT / ".venv-vllm").glob("lib/python*/site-packages/vllm/benchmarks/serve.py"))
    if not sources:
        pytest.skip(".venv-vllm not installed")
    text = sources[0].read_text()
    for name in (
        SUMMARY_FIELDS
        + DETAIL_FIELDS
        + ("endpoint_type", "model_id", "num_prompts", "burstiness", "max_concurrency")
    ):
        assert f'"{name}"' in text, name
    for template in ('f"mean_{metric_attribute_name}_ms"', 'f"p{p_word}_{metric_attribute_name}_ms"'):
        assert template in text
