"""Drive one load point: send requests at a rate and/or under a concurrency cap, after a warm-up, and
turn the outputs into one result in vLLM's `bench serve` JSON shape."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from benchmarks.bench.arrivals import arrival_offsets
from benchmarks.bench.client import Endpoint, RequestOutput, send_request
from benchmarks.bench.datasets import SampleRequest
from benchmarks.bench.metrics import DEFAULT_PERCENTILES, compute_metrics, detail_lists, error_summary


@dataclass(frozen=True, slots=True)
class LoadPoint:
    max_concurrency: int | None = None  # None: no cap
    request_rate: float = math.inf  # requests/s; inf: all at once (up to the cap)
    burstiness: float = 1.0  # gamma shape of the gaps; 1: Poisson
    num_warmups: int = 0  # short requests sent (at the same concurrency) before the run; not measured
    seed: int = 0

    def label(self) -> str:
        parts = []
        if self.max_concurrency is not None:
            parts.append(f"c{self.max_concurrency}")
        if not math.isinf(self.request_rate):
            parts.append(
                f"r{self.request_rate:g}" + ("" if self.burstiness == 1.0 else f"b{self.burstiness:g}")
            )
        return "-".join(parts) or "all"


def make_client(timeout_s: float = 600.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits)


async def _send_all(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    requests: Sequence[SampleRequest],
    offsets: Sequence[float],
    max_concurrency: int | None,
    count_tokens: Callable[[str], int] | None,
) -> tuple[list[RequestOutput], float]:
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(request: SampleRequest, offset: float) -> RequestOutput:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is None:
            return await send_request(client, endpoint, request, count_tokens)
        async with gate:
            return await send_request(client, endpoint, request, count_tokens)

    outputs = await asyncio.gather(*(one(r, t) for r, t in zip(requests, offsets, strict=True)))
    return list(outputs), time.perf_counter() - start


async def run_load_point(
    endpoint: Endpoint,
    requests: Sequence[SampleRequest],
    point: LoadPoint,
    *,
    warmup_requests: Sequence[SampleRequest] = (),
    count_tokens: Callable[[str], int] | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput: dict[str, float] | None = None,
    detailed: bool = False,
    client: httpx.AsyncClient | None = None,
) -> dict[str, Any]:
    own_client = client is None
    client = client or make_client()
    try:
        if warmup_requests:
            await _send_all(
                client, endpoint, warmup_requests, [0.0] * len(warmup_requests), point.max_concurrency, None
            )
        offsets = arrival_offsets(len(requests), point.request_rate, point.burstiness, point.seed)
        outputs, duration = await _send_all(
            client, endpoint, requests, offsets, point.max_concurrency, count_tokens
        )
    finally:
        if own_client:
            await client.aclose()
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": endpoint.endpoint_type,
        "backend": endpoint.endpoint_type,
        "model_id": endpoint.model,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(point.request_rate) else point.request_rate,
        "burstiness": point.burstiness,
        "max_concurrency": point.max_concurrency,
        "num_warmups": len(warmup_requests),
        "goodput_slos_ms": goodput or None,
    }
    result.update(compute_metrics(outputs, duration, percentiles, goodput))
    result["error_counts"] = error_summary(outputs)
    if detailed:
        result.update(detail_lists(outputs))
    return result
