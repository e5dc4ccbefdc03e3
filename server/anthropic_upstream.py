"""An upstream's own Anthropic Messages API (`anthropic_base_url` of the overflow section or of a routing
target): a /v1/messages request goes to it as the client sent it (the model id mapped) instead of being
translated to chat completions, and its answer comes back as it is, with the client's model name and this
server's message id. The tally reads Anthropic's usage and stop reasons, so the ledger row is the same
as for a translated request."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse, Response

from server.errors import APIError
from server.overflow import UpstreamConfig
from server.overflow_upstream import Tally, UpstreamClient, UpstreamError
from server.routes.anthropic_events import CHAT_FINISH, sse

MESSAGES_PATH = "v1/messages"  # under anthropic_base_url, as the Anthropic SDKs call it
ANTHROPIC_VERSION = "2023-06-01"


def anthropic_client(base_url: str, api_key: str, cfg: UpstreamConfig) -> UpstreamClient:
    """A client of an Anthropic-compatible API; its key goes as x-api-key and as a bearer token (Anthropic
    reads the first, Anthropic-compatible gateways such as Z.ai's the second)."""
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if api_key:
        headers.update({"x-api-key": api_key, "Authorization": f"Bearer {api_key}"})
    return UpstreamClient(base_url, api_key, cfg, headers=headers)


def _tally_usage(tally: Tally, usage: Any) -> None:
    """Anthropic's usage in chat terms (prompt_tokens counts the cache reads, as the local ledger does)."""
    if not isinstance(usage, dict):
        return
    counted = dict(tally.usage or {})
    if "input_tokens" in usage:
        cached = int(usage.get("cache_read_input_tokens") or 0)
        counted["prompt_tokens"] = int(usage["input_tokens"] or 0) + cached
    if "output_tokens" in usage:
        counted["completion_tokens"] = int(usage["output_tokens"] or 0)
    tally.usage = counted


def _tally_stop(tally: Tally, stop_reason: Any) -> None:
    if stop_reason:
        tally.finish_reasons[0] = CHAT_FINISH.get(str(stop_reason), str(stop_reason))


class NativeMessages:
    """What OverflowService.serve and the routing layer need to answer from an upstream's /v1/messages:
    a stream rewriter and a JSON rewriter (UpstreamTranslation's interface)."""

    path = "/v1/messages"  # errors take Anthropic's shape

    def __init__(self, client_model: str) -> None:
        self.client_model = client_model  # the model name the client asked for, as the local path answers

    def rewriter(self, model: str, request_id: str, include_usage: bool, tally: Tally) -> MessagesPassThrough:
        return MessagesPassThrough(self.client_model, request_id, tally)

    def rewrite_json(self, raw: bytes, model: str, request_id: str, tally: Tally) -> Response:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("type") != "message":
            tally.ended = "error"
            error = UpstreamError("the response is not an Anthropic message", retryable=False, breaker=True)
            return error.api_error().response(self.path)
        _tally_usage(tally, body.get("usage"))
        _tally_stop(tally, body.get("stop_reason"))
        tally.content_chunks = len(body.get("content") or [])
        body["id"], body["model"] = request_id, self.client_model
        return JSONResponse(body, headers={"X-Request-Id": request_id})


class MessagesPassThrough:
    """Passes an upstream's Messages event stream on, event by event; message_start gets this server's id
    and the client's model name, the others go as they came. SseRewriter's interface (feed, done,
    failure)."""

    def __init__(self, client_model: str, request_id: str, tally: Tally) -> None:
        self.client_model, self.request_id, self.tally = client_model, request_id, tally
        self.done = False
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        out = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            out.append(self._event(event) + b"\n\n")
        return b"".join(out)

    def failure(self, error: APIError) -> tuple[bytes, ...]:
        return (sse("error", error.anthropic_body()),)

    def _event(self, event: bytes) -> bytes:
        data = next((line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")), b"")
        try:
            payload = json.loads(data) if data else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return event
        kind = payload.get("type")
        if kind == "message_start" and isinstance(payload.get("message"), dict):
            message = payload["message"]
            _tally_usage(self.tally, message.get("usage"))
            message["id"], message["model"] = self.request_id, self.client_model
            return sse("message_start", payload)[:-2]
        if kind == "content_block_delta":
            self.tally.saw_output()
        elif kind == "message_delta":
            _tally_usage(self.tally, payload.get("usage"))
            _tally_stop(self.tally, (payload.get("delta") or {}).get("stop_reason"))
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.tally.ended = "error"
            self.done = True
        return event
