"""Prometheus metrics under vLLM's names, one registry per app, and the per-request observer middleware
(HTTP counts by route and status, the structured access log; the in-flight count that draining waits on
is kept by server/http_guard.py, once a request's body is read).

Gauges and token counters are read from the engine at scrape time (engine.load(), engine.stats());
latency histograms, token-count histograms and finish reasons are observed by the routes as requests run.
An engine with its own Prometheus registry (vLLM: `engine.prometheus_registry()`) is scraped too: its
families come first, and ours with the same name are left out, so no name appears twice."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import tracing
from server.engine_api import Engine
from server.errors import internal_error, tracebacks
from server.logs import bind_request
from server.request_record import SCOPE_KEY, RequestRecord

access_log = logging.getLogger("glm_serve.access")
log = logging.getLogger("glm_serve.http")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
QUIET_PATHS = frozenset({"/health", "/metrics"})  # not in-flight work; their access lines are DEBUG


class ServerMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series, as vLLM (process-wide in prometheus_client)
        self.registry = CollectorRegistry()
        self.engine: Engine | None = None
        self.model_name = ""
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", m, buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Inter-token latency.", m, buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            m,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited before its first scheduled step (up to its first token when the engine does "
            "not report when it was scheduled).",
            m,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Finished sequences by finish reason.",
            [*m, "finished_reason"],
            registry=r,
        )
        self.http_requests = Counter(
            "glm_serve:http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.overflow_requests = Counter(
            "glm_serve:overflow_requests",
            "Requests sent to the overflow upstream, by trigger.",
            ["reason"],
            registry=r,
        )
        self.overflow_failures = Counter(
            "glm_serve:overflow_failures",
            "Overflowed requests the upstream failed (after retries).",
            registry=r,
        )
        self.overflow_fallbacks = Counter(
            "glm_serve:overflow_fallbacks",
            "Overflow decisions served locally instead (circuit_open, upstream_failed).",
            ["cause"],
            registry=r,
        )
        self.overflow_circuit_open = Gauge(
            "glm_serve:overflow_circuit_open",
            "1 while the overflow circuit breaker is open or half-open, else 0.",
            registry=r,
        )
        self.request_prompt_tokens: Histogram | None = None  # made in bind(): buckets need max_model_len
        self.request_generation_tokens: Histogram | None = None
        r.register(_EngineCollector(self))

    def bind(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self._ttft, self._itl = self.ttft.labels(model_name), self.itl.labels(model_name)
        self._e2e, self._queue = self.e2e.labels(model_name), self.queue_time.labels(model_name)
        if self.request_prompt_tokens is None:  # buckets up to the context length, as vLLM's
            context = getattr(engine, "max_model_len", 0) or 2**20  # test doubles may not say
            buckets = token_buckets(context)
            self.request_prompt_tokens, self.request_generation_tokens = (
                Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)
                for name, doc in (
                    ("vllm:request_prompt_tokens", "Number of prefill tokens processed, per request."),
                    ("vllm:request_generation_tokens", "Number of generation tokens processed, per request."),
                )
            )

    def observe_first_token(self, ttft_s: float, queue_s: float) -> None:
        self._ttft.observe(max(0.0, ttft_s))
        self._queue.observe(max(0.0, queue_s))

    def observe_inter_token(self, seconds: float) -> None:
        self._itl.observe(max(0.0, seconds))

    def observe_finished(
        self,
        finish_reason: str,
        e2e_s: float,
        prompt_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        self.request_success.labels(self.model_name, finish_reason).inc()
        self._e2e.observe(max(0.0, e2e_s))
        if self.request_prompt_tokens is not None and prompt_tokens is not None and output_tokens is not None:
            self.request_prompt_tokens.labels(self.model_name).observe(prompt_tokens)
            self.request_generation_tokens.labels(self.model_name).observe(output_tokens)

    def render(self) -> bytes:
        engine_registry = getattr(self.engine, "prometheus_registry", None)
        if engine_registry is None:
            return generate_latest(self.registry)
        return generate_latest(_FirstByName([engine_registry(), self.registry]))


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's 1-2-5 token buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max(max_model_len, 1):
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class _FirstByName:
    """The families of several registries, each name once: the first registry that has it wins."""

    def __init__(self, registries: list[Any]) -> None:
        self._registries = registries

    def collect(self):  # -> Iterator[Metric]
        seen: set[str] = set()
        for registry in self._registries:
            for family in registry.collect():
                if family.name not in seen:
                    seen.add(family.name)
                    yield family


class _EngineCollector:
    """Engine gauges and counters, read when Prometheus scrapes."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self):  # -> Iterator[Metric]
        engine = self._metrics.engine
        if engine is None:
            return
        labels = [self._metrics.model_name]
        load = engine.load()
        gauges = {
            "vllm:num_requests_running": ("Requests running on the engine.", load.num_running),
            "vllm:num_requests_waiting": ("Requests waiting to be scheduled.", load.num_waiting),
            "vllm:kv_cache_usage_perc": ("KV-cache usage, 0 to 1.", load.kv_usage),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, float(value))
            yield family
        stats = engine.stats()
        counters = {
            "vllm:prompt_tokens": ("Prefill tokens processed.", "prompt_tokens_total"),
            "vllm:generation_tokens": ("Generation tokens produced.", "generation_tokens_total"),
            "vllm:num_preemptions": ("Preemptions by the scheduler.", "num_preemptions_total"),
            "vllm:prefix_cache_queries": (
                "Prefix cache queries, in terms of number of queried tokens.",
                "prefix_cache_queries_total",
            ),
            "vllm:prefix_cache_hits": (
                "Prefix cache hits, in terms of number of cached tokens.",
                "prefix_cache_hits_total",
            ),
        }
        for name, (doc, key) in counters.items():
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, float(stats.get(key, 0.0)))
            yield family
        if "spec_decode_num_drafts_total" in stats:
            yield from _spec_decode_counters(labels, stats)
        yield _cache_config_info(engine, stats)


SPEC_DECODE_COUNTERS = {
    "vllm:spec_decode_num_drafts": "Number of spec decoding drafts.",
    "vllm:spec_decode_num_draft_tokens": "Number of draft tokens.",
    "vllm:spec_decode_num_accepted_tokens": "Number of accepted tokens.",
}


def _spec_decode_counters(labels: list[str], stats: dict[str, float]):
    """Speculative decoding's counters, as vLLM names them (only an engine that drafts reports them; on the
    vLLM backend vLLM's own registry has them, and _FirstByName keeps those)."""
    for name, doc in SPEC_DECODE_COUNTERS.items():
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(labels, stats[name.removeprefix("vllm:") + "_total"])
        yield family
    family = CounterMetricFamily(
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "Accepted tokens per draft position.",
        labels=["model_name", "position"],
    )
    prefix = "spec_decode_num_accepted_tokens_per_pos_total/"
    for key, value in stats.items():
        if key.startswith(prefix):
            family.add_metric([*labels, key.removeprefix(prefix)], value)
    yield family


def _cache_config_info(engine: Engine, stats: dict[str, float]) -> GaugeMetricFamily:
    """vLLM's information gauge (value 1) whose labels carry the KV-cache configuration."""
    config = getattr(engine, "config", None)
    info = {
        "block_size": getattr(config, "block_size", ""),
        "cache_dtype": getattr(config, "kv_cache_dtype", ""),
        "enable_prefix_caching": getattr(config, "enable_prefix_caching", ""),
        "gpu_memory_utilization": getattr(config, "memory_fraction", ""),
        "num_gpu_blocks": int(stats["num_kv_blocks"]) if "num_kv_blocks" in stats else "",
    }
    family = GaugeMetricFamily(
        "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(info)
    )
    family.add_metric([str(v) for v in info.values()], 1.0)
    return family


class UsageSink(Protocol):
    def record(
        self, scope: Scope, status: int, started_at: float, latency_s: float, record: RequestRecord
    ) -> None: ...


def _served_headers(headers: list[tuple[bytes, bytes]], record: RequestRecord) -> list[tuple[bytes, bytes]]:
    """X-Served-By (local | holysheep) and X-Upstream-Model from the request's record, and on every answer
    (errors included) the request id as X-Request-Id (server/logs.py: the client's own, when it sent a
    valid one), so a client can find its log lines and ledger row."""
    headers = [(name, value) for name, value in headers if name.lower() != b"x-request-id"]
    present = {name.lower() for name, _ in headers}
    extra = [(b"x-request-id", record.request_id.encode())]
    for header, value in ((b"x-served-by", record.served_by), (b"x-upstream-model", record.upstream_model)):
        if value and header not in present:
            extra.append((header, value.encode()))
    return [*headers, *extra]


class InFlight(Protocol):
    log_prompts: bool


class RequestObserver:
    """ASGI middleware around everything: counts requests by route and status, writes one JSON access
    line per request (the request's record, server/request_record.py, which the routes fill), and turns an unexpected exception
    into a 500 whose detail goes to the log only (tracebacks rate-limited)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServerMetrics,
        serving: InFlight,
        route_paths: frozenset[str],
        usage: UsageSink | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.serving = serving
        self.route_paths = route_paths  # label for requests answered before routing (401, 413)
        self.usage = usage  # the usage ledger: one row per metered request, written here

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        started_at = time.time()
        path: str = scope["path"]
        record = scope.setdefault("state", {})[SCOPE_KEY] = RequestRecord()
        status = 500
        response_started = False

        async def observing_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message = {**message, "headers": _served_headers(message.get("headers", []), record)}
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        with bind_request(record, headers), tracing.server_span(scope["method"], path, headers) as span:
            try:
                await self.app(scope, receive, observing_send)
            except Exception as exc:
                request_id = record.request_id
                tracebacks.log(
                    log, exc, "unhandled error in %s %s (request id %s)", scope["method"], path, request_id
                )
                status = 500
                if not response_started:
                    await internal_error(request_id).response(path)(scope, receive, send)
            finally:
                status = record.status or status
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
                self._finish(scope, path, status, started, started_at, record)

    def _finish(
        self, scope: Scope, path: str, status: int, started: float, started_at: float, record: RequestRecord
    ) -> None:
        route = scope.get("route")
        route_path = getattr(route, "path", None) or (path if path in self.route_paths else "unmatched")
        self.metrics.http_requests.labels(scope["method"], route_path, str(status)).inc()
        latency_s = time.perf_counter() - started
        if self.usage is not None:
            try:
                self.usage.record(scope, status, started_at, latency_s, record)
            except Exception:
                log.exception("usage row for %s not recorded", record.request_id)
        self._log(scope, path, status, latency_s, record)

    def _log(self, scope: Scope, path: str, status: int, latency_s: float, record: RequestRecord) -> None:
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        line = {
            "method": scope["method"],
            "path": path,
            "status": status,
            **record.log_fields(with_prompt=self.serving.log_prompts),
            "latency_s": round(latency_s, 4),
        }
        access_log.log(level, json.dumps(line, default=str), extra={"access": line})
