"""The overflow upstream (HolySheep, or any OpenAI-compatible server): an httpx client with separate
connect and first-byte timeouts and retries only before the first byte, the SSE/JSON pass-through that
rewrites the model back to the local id, and the token tally the usage ledger reads."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import APIError
from server.overflow import UpstreamConfig
from server.request_record import RequestRecord
from server.routes.sse import SSE_DONE, error_event

RETRYABLE_STATUS = frozenset({408, 500, 502, 503, 504})
# Statuses that say the upstream (or our account on it) is unusable: they count towards opening the circuit.
# Other 4xx mean the upstream is up but refused this request: it still falls back, the circuit stays closed.
BREAKER_STATUS = frozenset({401, 403, 408, 429})


class UpstreamError(Exception):
    """The upstream failed before its first byte (or, with after_first_byte, during the body)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool, breaker: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.breaker = breaker

    def api_error(self) -> APIError:
        return APIError(502, f"The overflow upstream failed: {self}", code="upstream_error")


def status_error(status: int, raw: bytes) -> UpstreamError:
    """An upstream error response as an UpstreamError whose message is the upstream's own."""
    message = raw[:300].decode(errors="replace").strip() or "(empty body)"
    try:
        body = json.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message") or message)
    except ValueError:
        pass
    return UpstreamError(
        f"HTTP {status}: {message}",
        status=status,
        retryable=status in RETRYABLE_STATUS,
        breaker=status >= 500 or status in BREAKER_STATUS,
    )


@dataclass(slots=True)
class Opened:
    """An upstream response whose first body bytes have arrived."""

    response: httpx.Response
    first: bytes
    rest: AsyncIterator[bytes]

    async def aclose(self) -> None:
        await self.response.aclose()


class UpstreamClient:
    """POST to an OpenAI-compatible API. open() returns once the first body byte has arrived: before
    that, transport errors, timeouts and retryable statuses are retried (with backoff); after it, nothing
    is retried. connect_timeout_s bounds the connection; first_byte_timeout_s the wait after it."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        cfg: UpstreamConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """headers: sent with every request (default: the key as a bearer token)."""
        self.cfg = cfg
        timeout = httpx.Timeout(
            connect=cfg.connect_timeout_s, read=None, write=cfg.connect_timeout_s, pool=cfg.connect_timeout_s
        )
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers
            if headers is not None
            else {"Authorization": f"Bearer {api_key}"}
            if api_key
            else {},
            timeout=timeout,
            transport=transport,
        )

    async def open(
        self,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        *,
        budget_s: float | None = None,
        on_failure: Callable[[UpstreamError], None] | None = None,
    ) -> Opened:
        """The upstream's response once its first body byte is in. All attempts together (connect, first
        byte, backoff) stay within budget_s (default cfg.budget_s); on_failure hears each failed attempt
        that says the upstream is unusable, as it happens (the circuit breaker counts it at once)."""
        cfg = self.cfg
        budget = cfg.budget_s if budget_s is None else budget_s
        deadline = time.monotonic() + budget
        error = UpstreamError("no attempt made", retryable=False, breaker=False)
        for attempt in range(1 + cfg.retries):
            if attempt:
                await asyncio.sleep(
                    min(cfg.retry_backoff_s * 2 ** (attempt - 1), deadline - time.monotonic())
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            limit = min(cfg.connect_timeout_s + cfg.first_byte_timeout_s, remaining)
            try:
                with anyio.fail_after(limit):
                    return await self._attempt(path, body, headers or {})
            except UpstreamError as exc:
                error = exc
            except TimeoutError:
                budget_spent = " (the overflow budget)" if limit == remaining else ""
                why = f"no first byte within {limit:g} s{budget_spent}"
                error = UpstreamError(why, retryable=True, breaker=True)
            except httpx.TransportError as exc:
                error = UpstreamError(f"{type(exc).__name__}: {exc}", retryable=True, breaker=True)
            if error.breaker and on_failure is not None:
                on_failure(error)
            if not error.retryable:
                break
        raise error

    async def _attempt(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Opened:
        request = self._client.build_request("POST", path.lstrip("/"), json=body, headers=headers)
        response = await self._client.send(request, stream=True)
        try:
            if response.status_code >= 400:
                raise status_error(response.status_code, await response.aread())
            rest = response.aiter_bytes()
            first = b""
            while not first:
                first = await anext(rest, None)  # type: ignore[arg-type]
                if first is None:
                    raise UpstreamError("the upstream sent an empty body", retryable=True, breaker=True)
            return Opened(response, first, rest)
        except BaseException:
            await response.aclose()
            raise

    async def aclose(self) -> None:
        await self._client.aclose()


async def next_chunk(opened: Opened, idle_timeout_s: float) -> bytes | None:
    """The next body chunk after the first, None at the end; UpstreamError when the upstream stalls or
    breaks."""
    try:
        with anyio.fail_after(idle_timeout_s):
            return await anext(opened.rest, None)  # type: ignore[arg-type]
    except TimeoutError:
        raise UpstreamError(f"no data for {idle_timeout_s:g} s", retryable=False, breaker=True) from None
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{type(exc).__name__}: {exc}", retryable=False, breaker=True) from None


# -- what the ledger learns from the upstream's answer ---------------------------------------------------
@dataclass(slots=True)
class Tally:
    local_prompt_tokens: int  # the local tokenizer's count: the estimate when the upstream sends no usage
    started: float = field(default_factory=time.monotonic)
    usage: dict[str, Any] | None = None
    finish_reasons: dict[int, str] = field(default_factory=dict)
    content_chunks: int = 0
    first_content: float | None = None
    ended: str | None = None  # None: finished normally; "abort" | "error"

    def observe_choices(self, choices: Any) -> None:
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            if _has_output(choice):
                self.saw_output()
            if choice.get("finish_reason"):
                self.finish_reasons[int(choice.get("index") or 0)] = str(choice["finish_reason"])

    def saw_output(self) -> None:
        """One chunk (or response) with generated output: counted, and the first one's time kept."""
        self.content_chunks += 1
        if self.first_content is None:
            self.first_content = time.monotonic()

    def fill(self, record: RequestRecord) -> None:
        """Write the usage fields of the request's record (its access line and ledger row): the upstream's
        token counts when it sent them, else this tally's estimate."""
        usage = self.usage if isinstance(self.usage, dict) and "prompt_tokens" in self.usage else None
        if usage is not None:
            record.prompt_tokens = int(usage["prompt_tokens"] or 0)
            record.completion_tokens = int(usage.get("completion_tokens") or 0)
        else:
            record.prompt_tokens, record.completion_tokens = self.local_prompt_tokens, self.content_chunks
        record.tokens_exact = usage is not None
        record.finish_reasons = [self.ended] if self.ended else sorted(set(self.finish_reasons.values()))
        if self.first_content is not None:
            record.ttft_s = round(self.first_content - self.started, 4)


OUTPUT_FIELDS = ("content", "reasoning_content", "reasoning", "tool_calls")


def _has_output(choice: dict[str, Any]) -> bool:
    """Does this choice (a chunk's or a response's) carry generated output?"""
    if choice.get("text"):
        return True
    message = choice.get("delta") or choice.get("message")
    return isinstance(message, dict) and any(message.get(k) for k in OUTPUT_FIELDS)


# -- pass-through -----------------------------------------------------------------------------------------
class SseRewriter:
    """Re-emits upstream SSE events with the local model id and request id; takes the usage (always
    asked of the upstream) and drops the usage-only chunk when the client did not ask for it."""

    def __init__(self, model: str, request_id: str, include_usage: bool, tally: Tally) -> None:
        self.model, self.request_id, self.include_usage, self.tally = model, request_id, include_usage, tally
        self._buffer = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")  # a \r may end one chunk
        out = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            out.append(self._event(event))
        return b"".join(out)

    def failure(self, error: APIError) -> tuple[bytes, ...]:
        """The end of a stream the upstream broke: an error event and [DONE]."""
        return error_event(error, self.request_id), SSE_DONE

    def _event(self, event: bytes) -> bytes:
        lines = []
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                lines.append(line)  # comments, event names: passed as they are
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                return SSE_DONE
            rewritten = self._chunk(payload)
            if rewritten is None:
                return b""
            lines.append(b"data: " + rewritten)
        return b"\n".join(lines) + b"\n\n" if any(lines) else b""

    def _chunk(self, payload: bytes) -> bytes | None:
        try:
            chunk = json.loads(payload)
        except ValueError:
            return payload
        if not isinstance(chunk, dict) or "error" in chunk:
            self.tally.ended = "error" if isinstance(chunk, dict) else self.tally.ended
            return payload
        if chunk.get("usage"):
            self.tally.usage = chunk["usage"]
        self.tally.observe_choices(chunk.get("choices"))
        if not self.include_usage:
            if not chunk.get("choices"):
                return None  # the usage chunk we asked for on the ledger's behalf
            chunk["usage"] = None
        chunk["model"], chunk["id"] = self.model, self.request_id
        return json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()


async def stream_events(opened: Opened, rewriter: SseRewriter, idle_timeout_s: float) -> AsyncIterator[bytes]:
    """The rewritten SSE stream; an upstream failure after the first byte ends it with an OpenAI error
    event and [DONE] (nothing is retried once the client has bytes)."""
    chunk: bytes | None = opened.first
    try:
        while chunk is not None:
            out = rewriter.feed(chunk)
            if out:
                yield out
            chunk = await next_chunk(opened, idle_timeout_s)
        if not rewriter.done:
            raise UpstreamError("the stream ended before [DONE]", retryable=False, breaker=True)
    except UpstreamError as exc:
        rewriter.tally.ended = "error"
        for chunk in rewriter.failure(exc.api_error()):
            yield chunk


class UpstreamStream(StreamingResponse):
    """An SSE response over an upstream stream that closes the upstream response however it ends (done,
    the client gone, a shutdown) and then reports the tally (the record fields the ledger reads)."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        opened: Opened,
        on_close: Callable[[], None],
        headers: dict[str, str],
    ) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
        )
        self._opened = opened
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                close_body = getattr(self.body_iterator, "aclose", None)
                if close_body is not None:
                    try:
                        await close_body()
                    except RuntimeError:  # still running: cancelled inside and finishing
                        pass
                await self._opened.aclose()
                self._on_close()


async def read_body(opened: Opened, idle_timeout_s: float) -> bytes:
    parts = [opened.first]
    while (chunk := await next_chunk(opened, idle_timeout_s)) is not None:
        parts.append(chunk)
    return b"".join(parts)


def rewrite_json(raw: bytes, model: str, request_id: str, tally: Tally) -> Response:
    """A non-streaming upstream answer with the local model id; 502 if it is not a JSON object."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        tally.ended = "error"
        error = UpstreamError("the response is not a JSON object", retryable=False, breaker=True)
        return error.api_error().response()
    tally.usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    tally.observe_choices(body.get("choices"))
    body["model"], body["id"] = model, request_id
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        media_type="application/json",
        headers={"X-Request-Id": request_id},
    )
