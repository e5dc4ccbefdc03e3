"""The front door of every request, before routing: connections, bodies and in-flight work are bounded.

Past server.max_connections a request gets 503 (with Retry-After, and Connection: close to shed the
connection): open connections as uvicorn counts them (server/cli.py gives the guard that count), or
requests under way here, bodies still arriving included. RequestGuard then reads the whole body first,
within body_read_timeout_s (408 past it) and max_body_bytes
(413, by Content-Length at once or as soon as the bytes pass it); all bodies still arriving together
hold at most max_pending_body_bytes beyond their first 64 KiB each (503 past it), so half-sent bodies
cannot grow the process, and small requests still pass while they stall. A JSON body nested deeper than
max_json_depth or holding text UTF-8 cannot encode (a lone surrogate such as "\\ud800") is a 400 here,
before pydantic, a template or a tokenizer can fail on it. Only then does the request count as in
flight: past max_in_flight_requests it gets 503, past the per-key limit 429 (both with Retry-After).
So a client that sends half a body holds no in-flight slot and the drain never waits for it.

Headers are bounded by h11 (server.max_header_bytes); server/cli.py passes it to uvicorn."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from server.asgi_body import ParsedBody, replay
from server.config import ServerConfig
from server.errors import (
    APIError,
    bad_request,
    body_too_large,
    request_timeout,
    too_many_requests,
    unavailable,
)
from server.request_record import request_record

QUIET_PATHS = frozenset({"/health", "/metrics"})  # not in-flight work: never refused for load here
POOL_PARSE_BYTES = 64 * 1024  # bodies larger than this are parsed (and checked) in the front-end pool
SMALL_BODY_BYTES = 64 * 1024  # each body's first bytes: outside max_pending_body_bytes, so small requests
# always get through while large half-sent bodies hold the shared allowance


@dataclass(frozen=True, slots=True)
class GuardLimits:
    max_connections: int
    max_body_bytes: int
    body_read_timeout_s: float
    max_in_flight: int
    max_per_key: int | None
    max_json_depth: int
    max_pending_body_bytes: int

    @classmethod
    def from_server(cls, server: ServerConfig) -> GuardLimits:
        return cls(
            server.max_connections, server.max_body_bytes, server.body_read_timeout_s, server.max_in_flight_requests,
            server.max_concurrent_requests_per_key, server.max_json_depth, server.max_pending_body_bytes,
        )  # fmt: skip


class _TooManyPendingBytes(Exception):
    pass


class _ClientGone(Exception):
    pass


class RequestGuard:
    def __init__(self, app: ASGIApp, *, serving: Any, limits: GuardLimits) -> None:
        self.app = app
        self.serving = serving  # routes/deps.py ServingState: in_flight, pool
        self.limits = limits
        self.per_key: Counter[str] = Counter()
        self.pending_body_bytes = 0  # bytes of bodies still arriving, all connections together
        self.under_way = 0  # requests past the connection check and not yet answered (quiet paths aside)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in QUIET_PATHS:
            await self._serve(scope, receive, send, counted=False)
            return
        if self._too_many_connections():
            limit = self.limits.max_connections
            refusal = APIError(
                503, f"The server has {limit} connections open, its limit; retry shortly.",
                code="too_many_connections", headers={"Retry-After": "1", "Connection": "close"},
            )  # fmt: skip
            await refusal.response(scope["path"])(scope, receive, send)
            return
        self.under_way += 1
        try:
            await self._serve(scope, receive, send, counted=True)
        finally:
            self.under_way -= 1

    def _too_many_connections(self) -> bool:
        """uvicorn's open connections (this one included), or the requests under way here (others)."""
        count = self.serving.open_connections
        connections = count() if count is not None else 0
        return connections > self.limits.max_connections or self.under_way >= self.limits.max_connections

    async def _serve(self, scope: Scope, receive: Receive, send: Send, counted: bool) -> None:
        try:
            body = await self._read_body(scope, receive)
            await self._check_json(scope, body)
        except _ClientGone:
            request_record(scope).status = 499
            return
        except asyncio.CancelledError:  # the server stops while the body is still arriving
            request_record(scope).status = 499
            raise
        except APIError as error:
            await error.response(scope["path"])(scope, receive, send)
            return
        key = getattr(scope.get("state", {}).get("api_key"), "key_id", "anonymous")
        if counted:
            refusal = self._refusal(key)
            if refusal is not None:
                await refusal.response(scope["path"])(scope, receive, send)
                return
            self.serving.in_flight += 1
            self.per_key[key] += 1
        try:
            await self.app(scope, replay(body, receive), send)
        finally:
            if counted:
                self.serving.in_flight -= 1
                self.per_key[key] -= 1
                if not self.per_key[key]:
                    del self.per_key[key]

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise body_too_large(limit)
        held = 0
        try:
            async with asyncio.timeout(self.limits.body_read_timeout_s):
                parts: list[bytes] = []
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone()
                    chunk = message.get("body", b"")
                    if held + len(chunk) > limit:
                        raise body_too_large(limit)
                    counted = max(0, held + len(chunk) - SMALL_BODY_BYTES) - max(0, held - SMALL_BODY_BYTES)
                    if counted and self.pending_body_bytes + counted > self.limits.max_pending_body_bytes:
                        raise _TooManyPendingBytes()
                    held += len(chunk)
                    self.pending_body_bytes += counted
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(parts)
        except TimeoutError:
            raise request_timeout(self.limits.body_read_timeout_s) from None
        except _TooManyPendingBytes:
            raise unavailable(
                "The server is receiving too many request bodies at once; retry shortly.",
                1.0,
                code="server_busy",
            ) from None
        finally:
            self.pending_body_bytes -= max(0, held - SMALL_BODY_BYTES)

    async def _check_json(self, scope: Scope, body: bytes) -> None:
        """A large body is parsed and checked in the front-end pool, and its parse kept for the route
        (server/asgi_body.py); a small one is checked here only when cheap byte counts say it might fail."""
        depth = self.limits.max_json_depth
        pool = getattr(self.serving, "pool", None)
        if pool is not None and len(body) > POOL_PARSE_BYTES:
            parsed, problem = await pool.run(parse_and_check, body, depth)
            parsed.store(scope)
        elif needs_json_check(body, depth):
            _, problem = parse_and_check(body, depth)
        else:
            problem = None
        if problem is not None:
            raise problem

    def _refusal(self, key: str) -> APIError | None:
        limits = self.limits
        if self.serving.in_flight >= limits.max_in_flight:
            return unavailable(
                f"The server has {limits.max_in_flight} requests in flight, its limit; retry shortly.",
                1.0, code="too_many_requests_in_flight",
            )  # fmt: skip
        if limits.max_per_key is not None and self.per_key[key] >= limits.max_per_key:
            return too_many_requests(
                f"This API key has {limits.max_per_key} requests in flight, its limit; retry when one ends.",
                1.0, code="concurrency_limit_exceeded",
            )  # fmt: skip
        return None


def needs_json_check(body: bytes, max_depth: int) -> bool:
    """Could this body nest too deep or carry a lone surrogate? Cheap byte counts answer no for most."""
    if not body:
        return False
    return b"\\u" in body or body.count(b"[") + body.count(b"{") > max_depth


def parse_and_check(body: bytes, max_depth: int) -> tuple[ParsedBody, APIError | None]:
    """The body parsed, and a 400 for JSON nested deeper than max_depth or holding a string UTF-8 cannot
    encode; no 400 when the body is fine or is not JSON at all (the route's own parser answers that)."""
    parsed = ParsedBody.parse(body)
    if isinstance(parsed.error, RecursionError):
        return parsed, _too_deep(max_depth)
    if parsed.error is not None:
        return parsed, None
    return parsed, value_problem(parsed.value, max_depth)


def value_problem(value: Any, max_depth: int) -> APIError | None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and not _encodable(item):
                return bad_request(
                    "The request body holds invalid Unicode (a lone surrogate escape such as \\ud800); "
                    "send text as valid UTF-16 pairs or UTF-8.",
                    code="invalid_unicode",
                )
            continue
        if isinstance(item, dict | list):
            if depth > max_depth:
                return _too_deep(max_depth)
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                stack.append((child, depth + 1))
                if isinstance(key, str):
                    stack.append((key, depth))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_deep(max_depth: int) -> APIError:
    return bad_request(f"The request body nests deeper than {max_depth} levels.", code="nesting_too_deep")
