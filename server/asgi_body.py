"""A request body read once, before the app: replayed to whichever app serves it, and its JSON parsed once.

The request guard reads every body whole (server/http_guard.py). A large body's JSON is parsed in the
front-end pool, off the event loop, and the outcome (the value, or the exception json.loads raised) is
kept in the request's scope; ParsedBodyRoute's requests return it from `json()`, so FastAPI validates the
route's model from it without parsing the body again on the loop. The outcome is used only for the very
bytes it was parsed from; any other body (a route given a rewritten one) is parsed as usual."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import Message, Receive, Scope

PARSED_BODY_KEY = "parsed_json_body"  # in scope["state"]


def replay(body: bytes, receive: Receive | None) -> Receive:
    """A receive that gives the body already read, as one message; then the connection's own messages (a
    disconnect). receive None: no client behind the request (a shadow call), so it waits until cancelled."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            await asyncio.Event().wait()
        return await receive()  # type: ignore[misc]

    return replayed


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """What json.loads made of `body`: its value, or the exception it raised (raised again when read)."""

    body: bytes
    value: Any = None
    error: Exception | None = None

    @classmethod
    def parse(cls, body: bytes) -> ParsedBody:
        try:
            return cls(body, json.loads(body))
        except Exception as exc:  # JSONDecodeError, UnicodeDecodeError, RecursionError: the route answers
            return cls(body, error=exc)

    def store(self, scope: Scope) -> None:
        scope.setdefault("state", {})[PARSED_BODY_KEY] = self


def body_json(scope: Scope, body: bytes) -> Any:
    """json.loads(body), taken from the guard's parse when it was of these very bytes."""
    parsed = scope.get("state", {}).get(PARSED_BODY_KEY)
    if parsed is None or len(parsed.body) != len(body) or parsed.body != body:
        return json.loads(body)
    if parsed.error is not None:
        raise parsed.error
    return parsed.value


class ParsedBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = body_json(self.scope, await self.body())
        return self._json


class ParsedBodyRoute(APIRoute):
    """An APIRoute whose handler reads the JSON body the guard parsed (APIRouter(route_class=...))."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parsed_body_handler(request: Request) -> Response:
            return await handler(ParsedBodyRequest(request.scope, request.receive))

        return parsed_body_handler
