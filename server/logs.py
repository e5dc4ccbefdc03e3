"""Log lines, as text or JSON (`--log-format text|json`), each tagged with the request it belongs to.

The request id of a request is the client's X-Request-Id when it is a valid one (REQUEST_ID: at most
128 visible characters, no quotes or spaces), else the id of the response (chatcmpl-..., cmpl-...) or
a generated req-...; it is echoed in the X-Request-Id response header, written in the access line and
the usage ledger, and sent to the overflow upstream. RequestObserver binds the request's context
(bind_request) for the time the request runs, so every line logged on its behalf carries its id.

JSON lines are one object per line: time, level, logger, message, request_id, trace_id, exception; an
access line (logger glm_serve.access) carries the request's record (server/request_record.py) instead of
a message: method, path, status, model, served_by, prompt_tokens, completion_tokens, ttft_s, latency_s
and the rest. Prompts stay out of it unless server.log_prompts; API keys and the upstream key are replaced by
[redacted] in every line, whatever logged them."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from server import tracing
from server.request_record import RequestRecord

REQUEST_ID = re.compile(r"^[A-Za-z0-9._~:;/+=@-]{1,128}$")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"


@dataclass(slots=True)
class RequestContext:
    record: RequestRecord  # the request's record (server/metrics.py: RequestObserver)
    traceparent: str | None = None


_current: ContextVar[RequestContext | None] = ContextVar("glm_serve_request", default=None)


def valid_request_id(value: str | None) -> str | None:
    return value if value and REQUEST_ID.match(value) else None


@contextmanager
def bind_request(record: RequestRecord, headers: Mapping[str, str]) -> Iterator[RequestContext]:
    """Take the client's X-Request-Id (when valid) and traceparent; tag log lines with them meanwhile."""
    record.client_request_id = valid_request_id(headers.get("x-request-id"))
    context = RequestContext(record, tracing.valid_traceparent(headers.get("traceparent")))
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def upstream_headers(
    record: RequestRecord, upstream_span: Any, incoming: Mapping[str, str]
) -> dict[str, str]:
    """What the overflow upstream gets to correlate: X-Request-Id, traceparent and tracestate."""
    return {"X-Request-Id": record.request_id, **tracing.propagation_headers(upstream_span, incoming)}


# -- formatting ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Secrets:
    """Strings no log line may contain (API keys, the upstream key); longest first, so a key that
    contains another is redacted whole."""

    values: list[str] = field(default_factory=list)

    def add(self, items: Iterable[str]) -> None:
        found = {*self.values, *(s for s in items if s and len(s) >= 6)}
        self.values = sorted(found, key=len, reverse=True)

    def redact(self, line: str) -> str:
        for secret in self.values:
            if secret in line:
                line = line.replace(secret, REDACTED)
        return line


SECRETS = Secrets()


class RequestFilter(logging.Filter):
    """Adds request_id and trace_id to records logged while a request is bound."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        record.request_id = None
        record.trace_id = None
        if context is not None:
            record.request_id = context.record.client_request_id or context.record.id
            record.trace_id = tracing.trace_id(context.traceparent)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id and getattr(record, "access", None) is None:  # the access line has its id inside
            line += f" [request_id={request_id}]"
        return SECRETS.redact(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        for name in ("request_id", "trace_id"):
            if getattr(record, name, None):
                line[name] = getattr(record, name)
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            line.update(access)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return SECRETS.redact(json.dumps(line, default=str))


class _OwnHandler(logging.StreamHandler):
    """The handler configure_logging() installs: writes to `stream`, else to sys.stderr as it is when the
    record comes (pytest and other tools swap sys.stderr; a handler holding the old one would write to a
    closed file)."""

    def __init__(self, stream: Any = None) -> None:
        logging.Handler.__init__(self)
        self._fixed = stream

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return self._fixed if self._fixed is not None else sys.stderr


def make_handler(fmt: str, stream: Any = None) -> logging.Handler:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = _OwnHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestFilter())
    return handler


def configure_logging(level: str, fmt: str = "text") -> None:
    """The root logger writes `fmt` lines to stderr (uvicorn's own loggers propagate to it); a second
    call replaces the handler of the first, and handlers others installed (pytest's) stay."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OwnHandler)]:
        root.removeHandler(handler)
    root.addHandler(make_handler(fmt))
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become log lines too, in the same format
