"""OpenTelemetry tracing, on when OTEL_EXPORTER_OTLP_ENDPOINT is set (the `otel` extra installs the SDK
and its OTLP/HTTP exporter; the standard OTEL_* variables configure them).

Spans of one request: the HTTP server span (RequestObserver, a child of an incoming W3C traceparent),
and under it `admission`, `queue` (arrival to first scheduled), `prefill` (scheduled to first token),
`decode` (first token to finish) and `upstream call` (an overflowed request). The engine phases are
recorded when they are over, from the times the engine reports on its deltas, so the engine loop
never touches a span. With tracing off every function here is a cheap no-op, and an incoming
traceparent is still passed on to the overflow upstream unchanged."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from server.config_schema import ConfigError

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # the API comes with FastAPI today; without it tracing is simply off
    trace = None  # type: ignore[assignment]

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_tracer: Any = None  # set by setup_tracing() or use_provider(); None: tracing is off


def setup_tracing(environ: Mapping[str, str] = os.environ) -> bool:
    """Install the OTLP exporter when OTEL_EXPORTER_OTLP_ENDPOINT is set; True when tracing is on."""
    if not environ.get(ENDPOINT_ENV):
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            f"{ENDPOINT_ENV} is set but the OpenTelemetry SDK is missing: pip install 'glm-serve[otel]'"
        ) from None
    service = environ.get("OTEL_SERVICE_NAME", "glm-serve")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use_provider(provider)
    return True


def use_provider(provider: Any | None) -> None:
    """Trace through `provider` (an SDK TracerProvider; tests pass one with an in-memory exporter)."""
    global _tracer
    _tracer = provider.get_tracer("glm_serve") if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


def valid_traceparent(value: str | None) -> str | None:
    return value if value and TRACEPARENT.match(value) and not value.startswith("ff") else None


@contextmanager
def server_span(method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
    """The request's span, current while the request runs, child of the client's traceparent."""
    if _tracer is None:
        yield None
        return
    parent = propagate.extract(dict(headers))
    span = _tracer.start_span(f"{method} {path}", context=parent, kind=trace.SpanKind.SERVER)
    span.set_attributes({"http.request.method": method, "url.path": path})
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    finally:
        otel_context.detach(token)
        span.end()


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def start_span(name: str, **attributes: Any) -> Any:
    """A span the caller ends (span.end()); None when tracing is off."""
    return _tracer.start_span(name, attributes=attributes) if _tracer is not None else None


def end_span(started: Any, error: str | None = None) -> None:
    if started is None:
        return
    if error is not None:
        started.set_status(trace.Status(trace.StatusCode.ERROR, error))
    started.end()


def record_phases(arrival: float, scheduled: float, first_token: float, finished: float) -> None:
    """queue, prefill and decode of one choice, from time.monotonic() values, as children of the
    current span."""
    if _tracer is None:
        return
    offset_ns = time.time_ns() - time.monotonic_ns()
    phases = (
        ("queue", arrival, scheduled),
        ("prefill", scheduled, first_token),
        ("decode", first_token, finished),
    )
    for name, start, end in phases:
        phase = _tracer.start_span(name, start_time=int(start * 1e9) + offset_ns)
        phase.end(end_time=int(max(end, start) * 1e9) + offset_ns)


def propagation_headers(started: Any, incoming: Mapping[str, str]) -> dict[str, str]:
    """traceparent (and tracestate) for an outgoing call: the context of `started` when tracing is on,
    else the client's own traceparent passed through."""
    if _tracer is not None and started is not None:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(started))
        return carrier
    traceparent = valid_traceparent(incoming.get("traceparent"))
    if traceparent is None:
        return {}
    tracestate = incoming.get("tracestate")
    return {"traceparent": traceparent, **({"tracestate": tracestate[:512]} if tracestate else {})}


def trace_id(incoming_traceparent: str | None) -> str | None:
    """The trace id for log lines: the current span's, else the client's traceparent's."""
    if _tracer is not None:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            return format(context.trace_id, "032x")
    traceparent = valid_traceparent(incoming_traceparent)
    return traceparent.split("-")[1] if traceparent else None
