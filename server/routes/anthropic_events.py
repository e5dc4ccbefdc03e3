"""The Anthropic Messages wire format: the message object, and the stream of events

    message_start, ping, (content_block_start, content_block_delta..., content_block_stop)...,
    message_delta (stop_reason, usage), message_stop

GLM reasoning becomes `thinking` blocks (with a signature, as the SDKs expect), content `text` blocks and
tool calls `tool_use` blocks whose input streams as partial JSON (input_json_delta). Each event is
`event: <type>` plus `data: <json>`, as Anthropic sends them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from server.errors import APIError
from server.protocol import AssistantMessage
from server.routes.api_encoder import Outcome
from server.routes.chat_output import MessageDelta


def sse(event_type: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event_type}\ndata: {payload}\n\n".encode()


def thinking_signature(thinking: str) -> str:
    """An opaque signature for a thinking block (clients send it back; this server does not check it)."""
    return "glm-serve-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


CHAT_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}
"""Anthropic's stop_reason in chat terms (finish_reason): the inverse of stop_fields."""


def stop_fields(outcome: Outcome) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) in Anthropic's terms."""
    if outcome.finish_reason == "tool_calls":
        return "tool_use", None
    if outcome.finish_reason == "length":
        return "max_tokens", None
    if outcome.finish_reason == "stop" and isinstance(outcome.stop_reason, str):
        return "stop_sequence", outcome.stop_reason
    return "end_turn", None


def usage(outcome: Outcome) -> dict[str, int]:
    """Anthropic counts cache reads apart from input_tokens (the uncached part of the prompt)."""
    return {
        "input_tokens": outcome.prompt_tokens - outcome.cached_tokens,
        "output_tokens": outcome.completion_tokens,
        "cache_read_input_tokens": outcome.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments (JSON typed by the tool's schema) as the input object."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class AnthropicEncoder:
    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self._index = -1  # the open content block, -1 before the first
        self._open: str | None = None  # its type: thinking | text | tool_use; None: no block is open
        self._thinking: list[str] = []

    def message(self, content: list[dict[str, Any]], outcome: Outcome | None) -> dict[str, Any]:
        stop_reason, stop_sequence = stop_fields(outcome) if outcome is not None else (None, None)
        empty = Outcome(None, None, 0, 0)
        return {
            "id": self.request_id, "type": "message", "role": "assistant", "model": self.model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": usage(outcome or empty),
        }  # fmt: skip

    # -- the whole message --------------------------------------------------------------------------
    def complete(self, message: AssistantMessage, outcome: Outcome) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if message.reasoning_content:
            thinking = message.reasoning_content
            content.append(
                {"type": "thinking", "thinking": thinking, "signature": thinking_signature(thinking)}
            )
        if message.content:
            content.append({"type": "text", "text": message.content})
        for call in message.tool_calls or []:
            content.append(
                {"type": "tool_use", "id": call.id, "name": call.function.name,
                 "input": tool_input(call.function.arguments)}
            )  # fmt: skip
        return self.message(content, outcome)

    # -- the stream ---------------------------------------------------------------------------------
    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes:
        message = self.message([], None)
        message["usage"] = usage(Outcome(None, None, prompt_tokens, 0, cached_tokens))
        return sse("message_start", {"type": "message_start", "message": message}) + self.keepalive()

    def keepalive(self) -> bytes:
        return sse("ping", {"type": "ping"})

    def delta(self, delta: MessageDelta) -> bytes:
        out: list[bytes] = []
        if delta.reasoning_content:
            self._thinking.append(delta.reasoning_content)
            out += self._open_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._block_delta({"type": "thinking_delta", "thinking": delta.reasoning_content}))
        if delta.content:
            out += self._open_block("text", {"type": "text", "text": ""})
            out.append(self._block_delta({"type": "text_delta", "text": delta.content}))
        for call in delta.tool_calls:
            function = call.function
            if call.id is not None:  # the header of a new call
                name = function.name if function is not None else ""
                block = {"type": "tool_use", "id": call.id, "name": name or "", "input": {}}
                out += self._open_block("tool_use", block, new=True)
            if function is not None and function.arguments and self._open == "tool_use":
                out.append(
                    self._block_delta({"type": "input_json_delta", "partial_json": function.arguments})
                )
        return b"".join(out)

    def finish(self, outcome: Outcome) -> bytes:
        stop_reason, stop_sequence = stop_fields(outcome)
        return b"".join(
            [
                *self._close_block(),
                sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                        "usage": usage(outcome),
                    },
                ),
                sse("message_stop", {"type": "message_stop"}),
            ]
        )

    def error(self, error: APIError) -> bytes:
        return sse("error", error.anthropic_body())

    def _open_block(self, kind: str, block: dict[str, Any], new: bool = False) -> list[bytes]:
        if self._open == kind and not new:
            return []
        out = self._close_block()
        self._index += 1
        self._open = kind
        out.append(sse("content_block_start", {"type": "content_block_start", "index": self._index,
                                               "content_block": block}))  # fmt: skip
        return out

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":
            signature = thinking_signature("".join(self._thinking))
            self._thinking = []
            out.append(self._block_delta({"type": "signature_delta", "signature": signature}))
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self._index}))
        self._open = None
        return out

    def _block_delta(self, delta: dict[str, Any]) -> bytes:
        return sse(
            "content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}
        )
