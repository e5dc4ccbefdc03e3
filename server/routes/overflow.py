"""Serving one admitted request on the overflow upstream, or falling back to the local queue.

The route has already decided (server/overflow.py: decide) that the request overflows. Here: the
circuit breaker gets its say, the body goes upstream with the mapped model id, and once the upstream's
first byte is in, the answer is passed through (streamed or not) with the local model id and the
headers X-Served-By: holysheep and X-Upstream-Model. Before that first byte nothing has been sent to
the client, so an upstream failure (after the retries) sends the request back to the local queue, or
to a 503 with Retry-After when the local queue cannot take it either: a request is never lost."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from fastapi import Request
from starlette.responses import Response

from server import tracing
from server.anthropic_upstream import MESSAGES_PATH, anthropic_client
from server.config import Config, ConfigError
from server.errors import APIError
from server.logs import upstream_headers
from server.metrics import ServerMetrics
from server.overflow import (
    BreakerState,
    CircuitBreaker,
    Decision,
    OverflowConfig,
    Reason,
    parse_overflow_config,
)
from server.overflow_upstream import (
    SseRewriter,
    Tally,
    UpstreamClient,
    UpstreamError,
    UpstreamStream,
    read_body,
    rewrite_json,
    stream_events,
)
from server.request_record import RequestRecord, request_record
from server.routes.generation import ClientDisconnected, until_disconnected

log = logging.getLogger("glm_serve.overflow")
UPSTREAM_NAME = "holysheep"  # the X-Served-By value and the ledger's backend for overflowed requests
T = TypeVar("T")


class CircuitOpened(Exception):
    """The circuit opened (other requests' attempts failed) while this request waited on the upstream."""


async def _unless_circuit_opens(attempt: Awaitable[T], breaker: CircuitBreaker) -> T:
    """The attempt's result, unless the circuit opens first: then the attempt is cancelled."""
    signal = breaker.opened_signal()
    work = asyncio.ensure_future(attempt)
    watch = asyncio.ensure_future(signal.wait())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise CircuitOpened()
    return work.result()


class OverflowService:
    def __init__(
        self,
        policy: OverflowConfig,
        api_key: str,
        metrics: ServerMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self.breaker = CircuitBreaker(
            policy.circuit_breaker.failures, policy.circuit_breaker.cooldown_s, clock
        )
        self.client = UpstreamClient(policy.base_url, api_key, policy.upstream, transport=transport)
        self.messages_client = (  # the upstream's own /v1/messages, when configured
            anthropic_client(policy.anthropic_base_url, api_key, policy.upstream)
            if policy.anthropic_base_url
            else None
        )
        metrics.overflow_circuit_open.set_function(lambda: float(self.breaker.is_open()))
        for reason in Reason:
            metrics.overflow_requests.labels(reason.value)

    @classmethod
    def from_config(cls, config: Config, metrics: ServerMetrics) -> OverflowService | None:
        """None when overflow is off; a ConfigError when it is on without an upstream key."""
        policy = parse_overflow_config(config.extra.get("overflow"))
        if not policy.enabled:
            return None
        api_key = os.environ.get(policy.api_key_env, "")
        if not api_key:
            raise ConfigError(
                f"overflow is enabled but the environment variable {policy.api_key_env} (the upstream API key) is unset"
            )
        return cls(policy, api_key, metrics)

    async def serve(
        self,
        request: Request,
        decision: Decision,
        *,
        model: str,
        path: str,
        id_prefix: str,
        prompt_tokens: int,
        local: Callable[[], Decision],
        body: dict[str, Any] | None = None,
        translation: Any = None,
    ) -> Response | None:
        """The upstream's answer, or None: serve locally (the fallback). `local` re-checks the local
        queue for the fallback; when it rejects, its 503 is raised. `body` is the chat body to send (by
        default the request's own); a `translation` (routes/translated_upstream.py) turns the upstream's
        chat answer into another API's."""
        record = request_record(request.scope)
        body = dict(body if body is not None else await request.json())
        stream = bool(body.get("stream"))
        stream_options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        include_usage = stream and bool(stream_options.get("include_usage"))
        remote = self.policy.models[model]
        body["model"] = remote
        native = path == MESSAGES_PATH  # the upstream's own Messages API: the body goes as the client sent it
        if (
            stream and not native
        ):  # the ledger needs the upstream's token counts; the client sees them if it asked
            body["stream_options"] = {**stream_options, "include_usage": True}
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        assert decision.reason is not None
        record.id, record.model, record.stream = request_id, model, stream
        record.overflow_reason = decision.reason.value
        if not self.breaker.allow():
            return self._fall_back(record, local, "circuit_open", "the circuit breaker is open")
        probe = self.breaker.state is BreakerState.HALF_OPEN
        budget = self.policy.upstream.budget_s
        if probe:
            budget = min(budget, self.policy.circuit_breaker.probe_timeout_s)
        self.metrics.overflow_requests.labels(decision.reason.value).inc()
        tally = Tally(local_prompt_tokens=prompt_tokens)
        call = tracing.start_span("upstream call", **{"glm_serve.upstream_model": remote})
        headers = upstream_headers(record, call, request.headers)  # X-Request-Id, traceparent
        client = self.messages_client if native and self.messages_client is not None else self.client
        attempt = client.open(
            path, body, headers, budget_s=budget, on_failure=lambda _: self.breaker.record_failure()
        )
        try:
            opened = await until_disconnected(request, _unless_circuit_opens(attempt, self.breaker))
        except CircuitOpened:
            tracing.end_span(call, "the circuit opened")
            self.breaker.release()
            return self._fall_back(
                record, local, "circuit_open", "the circuit opened while this request waited"
            )
        except ClientDisconnected:
            tracing.end_span(call, "the client left")
            self.breaker.release()
            tally.ended = "abort"
            record.status, record.served_by, record.upstream_model = 499, UPSTREAM_NAME, remote
            tally.fill(record)
            return Response(status_code=499)
        except UpstreamError as exc:  # failed attempts were counted by the breaker as they happened
            tracing.end_span(call, str(exc))
            self.metrics.overflow_failures.inc()
            if not exc.breaker:  # the upstream answered: it is up, it refused this request
                self.breaker.record_success()
            log.warning("overflow of %s failed before the first byte: %s", request_id, exc)
            return self._fall_back(record, local, "upstream_failed", str(exc))
        except BaseException:  # cancelled: the span still ends
            tracing.end_span(call, "cancelled")
            raise
        self.breaker.record_success()
        record.served_by, record.upstream_model = UPSTREAM_NAME, remote
        headers = {"X-Request-Id": record.request_id}
        idle_timeout = self.policy.upstream.idle_timeout_s
        if stream:
            make_rewriter = translation.rewriter if translation is not None else SseRewriter
            rewriter = make_rewriter(model, request_id, include_usage, tally)

            def on_close() -> None:
                if tally.ended is None and not rewriter.done:
                    tally.ended = "abort"  # the client left mid-stream
                if tally.ended == "error":
                    self._failed_after_first_byte(request_id)
                tally.fill(record)
                tracing.end_span(call, "failed after the first byte" if tally.ended == "error" else None)

            return UpstreamStream(stream_events(opened, rewriter, idle_timeout), opened, on_close, headers)
        rewrite = translation.rewrite_json if translation is not None else rewrite_json
        try:
            return await self._complete(
                request, opened, tally, record, model, request_id, idle_timeout, rewrite
            )
        finally:
            tracing.end_span(call, "failed after the first byte" if tally.ended == "error" else None)

    async def _complete(
        self,
        request: Request,
        opened: Any,
        tally: Tally,
        record: RequestRecord,
        model: str,
        request_id: str,
        idle: float,
        rewrite: Callable[[bytes, str, str, Tally], Response],
    ) -> Response:
        try:
            raw = await until_disconnected(request, read_body(opened, idle))
            response = rewrite(raw, model, request_id, tally)
        except ClientDisconnected:
            tally.ended = "abort"
            record.status = 499
            response = Response(status_code=499)
        except UpstreamError as exc:
            tally.ended = "error"
            response = exc.api_error().response(request.url.path)
        finally:
            await opened.aclose()
        if tally.ended == "error":
            self._failed_after_first_byte(request_id)
        tally.fill(record)
        response.headers["X-Request-Id"] = record.request_id
        return response

    def _failed_after_first_byte(self, request_id: str) -> None:
        log.warning("overflow of %s failed after the first byte; the client got an error", request_id)
        self.metrics.overflow_failures.inc()
        self.breaker.record_failure()

    def _fall_back(self, record: RequestRecord, local: Callable[[], Decision], cause: str, why: str) -> None:
        decision = local()
        if decision.error is not None:
            error = decision.error
            raise APIError(
                error.status,
                f"{error.message} The overflow upstream is unavailable too ({why}).",
                code=error.code,
                headers=error.headers,
            )
        record.overflow_fallback = cause
        self.metrics.overflow_fallbacks.labels(cause).inc()
        return None

    async def aclose(self) -> None:
        await self.client.aclose()
        if self.messages_client is not None:
            await self.messages_client.aclose()
