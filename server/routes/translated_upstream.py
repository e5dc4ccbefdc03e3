"""An overflowed (or routed) Anthropic or Responses request: it went upstream as a chat completion; its
answer (a chat.completion, or chat.completion.chunk events) comes back through the API's own encoder, so
the client sees the same wire format whether it was served locally or upstream. A /v1/messages request
goes to an upstream's own Messages API instead when one is configured (server/anthropic_upstream.py).
The tally (usage, finish reasons, first content) is kept as for a chat request, so the ledger row is the
same."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from server.anthropic_upstream import MESSAGES_PATH, NativeMessages
from server.errors import APIError
from server.overflow_upstream import Tally, UpstreamError
from server.protocol import AssistantMessage, DeltaToolCall
from server.request_record import request_record
from server.routes.api_encoder import ApiEncoder, EncoderFactory, Outcome
from server.routes.chat_output import MessageDelta
from server.routing_targets import Target, upstream_body, upstream_response

if TYPE_CHECKING:
    from fastapi import Request

    from server.routes.translated_chat import TranslatedRequest


class UpstreamTranslation:
    """What OverflowService.serve needs to answer in another API: a stream rewriter and a JSON rewriter."""

    def __init__(self, make_encoder: EncoderFactory, path: str) -> None:
        self.make_encoder = make_encoder
        self.path = path  # the client's route: errors take its API's shape

    def rewriter(self, model: str, request_id: str, include_usage: bool, tally: Tally) -> TranslatingRewriter:
        return TranslatingRewriter(self.make_encoder(request_id), request_id, tally)

    def rewrite_json(self, raw: bytes, model: str, request_id: str, tally: Tally) -> Response:
        try:
            body = json.loads(raw)
            choice = body["choices"][0]
            message = AssistantMessage.model_validate(choice["message"])
        except (ValueError, KeyError, IndexError, TypeError, ValidationError):
            tally.ended = "error"
            error = UpstreamError("the response is not a chat completion", retryable=False, breaker=True)
            return error.api_error().response(self.path)
        tally.usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
        tally.observe_choices(body["choices"])
        outcome = _outcome(choice.get("finish_reason"), tally)
        encoder = self.make_encoder(request_id)
        return JSONResponse(encoder.complete(message, outcome), headers={"X-Request-Id": request_id})


def upstream_call(
    translated: TranslatedRequest, chat: dict[str, Any], native: bool, path: str
) -> tuple[str, dict[str, Any], UpstreamTranslation | NativeMessages]:
    """(upstream path, body, translation): the request in its own API for an upstream that speaks it
    (`native`: /v1/messages to an anthropic_base_url), else the chat completion it translates into.
    `path` is the client's route (errors take its API's shape)."""
    if native and translated.native_body is not None:
        return MESSAGES_PATH, translated.native_body, NativeMessages(str(translated.native_body.get("model")))
    return "chat/completions", chat, UpstreamTranslation(translated.make_encoder, path)


async def serve_on_target(
    target: Target, request: Request, translated: TranslatedRequest, chat: dict[str, Any], prompt_tokens: int
) -> Response:
    """A routed Messages or Responses request served by an upstream routing target: as the chat completion
    `chat`, or in its own API (upstream_call). A failure before the first byte raises UpstreamError: the
    routing layer falls back (canary) or answers it, as for a chat request; nothing has been sent yet."""
    record = request_record(request.scope)
    request_id = f"{translated.id_prefix}_{uuid.uuid4().hex}"
    native = target.messages_client is not None
    path, sent, translation = upstream_call(translated, chat, native, request.url.path)
    model = target.upstream_model(translated.model)
    opened = await target.open(
        path, {**sent, "model": model} if path == MESSAGES_PATH else upstream_body(sent, model)
    )
    body = {**chat, "model": translated.model}
    return await upstream_response(target, opened, body, record, request_id, translation, prompt_tokens)


class TranslatingRewriter:
    """Reads the upstream's chat.completion.chunk events (choice 0) and writes the API's events; the
    interface is SseRewriter's (feed, done, failure), so the overflow stream runs it unchanged."""

    def __init__(self, encoder: ApiEncoder, request_id: str, tally: Tally) -> None:
        self.encoder = encoder
        self.request_id = request_id
        self.tally = tally
        self.done = False
        self._buffer = b""
        self._started = False
        self._finish_reason: str | None = None

    def feed(self, data: bytes) -> bytes:
        out = [] if self._started else [self.encoder.start(self.tally.local_prompt_tokens, 0)]
        self._started = True
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer and not self.done:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(self._payload(line[5:].strip()))
        return b"".join(out)

    def failure(self, error: APIError) -> tuple[bytes, ...]:
        return (self.encoder.error(error),)

    def _payload(self, payload: bytes) -> bytes:
        if payload == b"[DONE]":
            self.done = True
            return self.encoder.finish(_outcome(self._finish_reason, self.tally))
        try:
            chunk = json.loads(payload)
        except ValueError:
            return b""
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            self.tally.ended = "error"
            self.done = True
            message = str((chunk["error"] or {}).get("message") or "the upstream failed mid-stream")
            return self.encoder.error(APIError(502, f"The overflow upstream failed: {message}"))
        if isinstance(chunk.get("usage"), dict):
            self.tally.usage = chunk["usage"]
        choices = chunk.get("choices") if isinstance(chunk.get("choices"), list) else []
        self.tally.observe_choices(choices)
        out = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            self._finish_reason = choice.get("finish_reason") or self._finish_reason
            delta = _message_delta(choice.get("delta"))
            if not delta.is_empty():
                out.append(self.encoder.delta(delta))
        return b"".join(out)


def _message_delta(delta: Any) -> MessageDelta:
    if not isinstance(delta, dict):
        return MessageDelta()
    calls = []
    for call in delta.get("tool_calls") or []:
        try:
            calls.append(DeltaToolCall.model_validate(call))
        except ValidationError:
            continue
    return MessageDelta(
        content=delta.get("content") or "",
        reasoning_content=delta.get("reasoning_content") or delta.get("reasoning") or "",
        tool_calls=calls,
    )


def _outcome(finish_reason: str | None, tally: Tally) -> Outcome:
    usage = tally.usage if isinstance(tally.usage, dict) else {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    output_details = usage.get("completion_tokens_details") or {}
    return Outcome(
        finish_reason=finish_reason,
        stop_reason=None,
        prompt_tokens=int(usage.get("prompt_tokens") or tally.local_prompt_tokens),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(output_details.get("reasoning_tokens") or 0),
    )
