"""Per-run metrics with the definitions and JSON field names of vLLM's `bench serve`.

- TTFT: time to the first output chunk. E2EL: time to the last chunk.
- TPOT (per request): (E2EL - TTFT) / (output_tokens - 1), for requests with more than one output token:
  the first token is excluded, as its time is TTFT's.
- ITL: every gap between consecutive output chunks, all requests pooled.
- Percentiles: numpy's linear interpolation; fields `{mean,median,std,pNN}_{ttft,tpot,itl,e2el}_ms`.
- Throughputs: completed requests and tokens over the run's duration (first send to last reply).
- Goodput: completed requests per second that meet every SLO given (ms; keys ttft, tpot, e2el); a request
  with one output token has TPOT 0 for this purpose. `request_goodput` is null when no SLO is given.
- Peak: output tokens per wall-clock second bucket, and the most requests active in a bucket."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.bench.client import RequestOutput

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
SLO_KEYS = ("ttft", "tpot", "e2el")

# The summary fields vLLM's `bench serve` writes (vllm/benchmarks/serve.py), in its order; the latency
# fields follow, one group per metric. Existing tooling reads these names.
SUMMARY_FIELDS = (
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
)
DETAIL_FIELDS = (
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "latencies",
    "start_times",
    "generated_texts",
    "errors",
)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile_key(metric: str, p: float) -> str:
    word = str(int(p)) if int(p) == p else str(p)
    return f"p{word}_{metric}_ms"


def latency_fields(metric: str, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[str]:
    stats = [f"mean_{metric}_ms", f"median_{metric}_ms", f"std_{metric}_ms"]
    return stats + [percentile_key(metric, p) for p in percentiles]


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds), as vLLM's --goodput."""
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or name not in SLO_KEYS:
            raise ValueError(f"goodput SLO {pair!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        slos[name] = float(value)
        if slos[name] < 0:
            raise ValueError(f"goodput SLO {pair!r} must not be negative")
    return slos


def _stats(metric: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    values = np.asarray(values_s, dtype=float) * 1000 if len(values_s) else np.zeros(1)
    out = {
        f"mean_{metric}_ms": float(np.mean(values)),
        f"median_{metric}_ms": float(np.median(values)),
        f"std_{metric}_ms": float(np.std(values)),
    }
    for p in percentiles:
        out[percentile_key(metric, p)] = float(np.percentile(values, p))
    return out


def request_tpot(out: RequestOutput) -> float:
    return (out.latency - out.ttft) / (out.output_tokens - 1) if out.output_tokens > 1 else 0.0


def is_good(out: RequestOutput, slos: dict[str, float]) -> bool:
    measured = {"ttft": out.ttft, "tpot": request_tpot(out), "e2el": out.latency}
    return all(measured[key] * 1000 <= limit for key, limit in slos.items())


def _peaks(done: Sequence[RequestOutput]) -> tuple[float, int]:
    """Most output chunks in one second bucket (first token at start+ttft, then the ITLs), and most
    requests active in one bucket."""
    if not done:
        return 0.0, 0
    t0 = min(o.start_time for o in done)
    buckets = math.ceil(max(o.start_time + o.latency for o in done) - t0) + 1
    tokens, active = np.zeros(buckets), np.zeros(buckets)
    for o in done:
        when = o.start_time + o.ttft + np.concatenate(([0.0], np.cumsum(o.itl)))
        index = np.clip((when - t0).astype(int), 0, buckets - 1)
        np.add.at(tokens, index, 1)
        active[int(o.start_time - t0) : int(o.start_time + o.latency - t0) + 1] += 1
    return float(tokens.max()), int(active.max())


def compute_metrics(
    outputs: Sequence[RequestOutput],
    duration_s: float,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The summary and latency fields of one run (no detail lists)."""
    done = [o for o in outputs if o.success]
    total_in = sum(o.prompt_len for o in done)
    total_out = sum(o.output_tokens for o in done)
    peak_tokens, peak_active = _peaks(done)
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration_s,
        "request_goodput": sum(is_good(o, goodput) for o in done) / duration_s if goodput else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_active,
    }
    tpots = [request_tpot(o) for o in done if o.output_tokens > 1]
    series = {
        "ttft": [o.ttft for o in done],
        "tpot": tpots,
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    for metric in LATENCY_METRICS:
        result.update(_stats(metric, series[metric], percentiles))
    return result


def detail_lists(outputs: Sequence[RequestOutput]) -> dict[str, list]:
    """Per-request lists, as vLLM's --save-detailed writes them (failed requests count 0 output tokens)."""
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": [o.output_tokens if o.success else 0 for o in outputs],
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs],
        "start_times": [o.start_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def error_summary(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    """Failed requests counted by their error's first line."""
    counts: dict[str, int] = {}
    for o in outputs:
        if not o.success:
            key = (o.error or "unknown").splitlines()[0][:200]
            counts[key] = counts.get(key, 0) + 1
    return counts
