"""ASGI pieces of routing: a response captured on its way to the client, and a request body read once
(server/asgi_body.py replays it to whichever app serves it)."""

from __future__ import annotations

from typing import Any

from starlette.types import Message, Receive, Send

from server.request_record import RequestRecord
from server.routing_compare import Outcome
from server.routing_read import read_outcome


class Capture:
    """Passes a response on (to `send`, or nowhere) and keeps its status and bytes for the comparison;
    `on_success` runs when a status below 400 starts the response."""

    def __init__(self, send: Send | None, on_success: Any = None) -> None:
        self._send, self._on_success = send, on_success
        self.status = 0
        self.parts: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status < 400 and self._on_success is not None:
                self._on_success()
        elif message["type"] == "http.response.body":
            self.parts.append(message.get("body", b""))
        if self._send is not None:
            await self._send(message)

    def outcome(self, target: str, latency_s: float, record: RequestRecord, api: str) -> Outcome:
        """The response (of `api`) read back; token counts the client did not ask to see come from the
        request's record."""
        raw = b"".join(self.parts)
        out = read_outcome(target, self.status, raw, latency_s, record.ttft_s, api)
        if out.output_tokens is None and out.ok:
            out.prompt_tokens, out.output_tokens = record.prompt_tokens, record.completion_tokens
        return out


async def read_all(receive: Receive) -> bytes | None:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)
