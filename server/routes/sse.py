"""Server-sent events for the streaming endpoints: `data: {json}\n\n` ... `data: [DONE]\n\n`.

Chunks are the hot path (one per token per choice), so ChunkEncoder serializes the fields every chunk of
a response shares once, and each chunk's choice with one json.dumps of a plain dict. The shapes are
OpenAI's chat.completion.chunk / text_completion; the HTTP tests validate them against the openai
client's own types."""

from __future__ import annotations

import json
import logging
from typing import Any

from server.errors import APIError, internal_error, tracebacks
from server.protocol import Usage

log = logging.getLogger("glm_serve.sse")
SSE_DONE = b"data: [DONE]\n\n"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class ChunkEncoder:
    def __init__(self, request_id: str, object_name: str, created: int, model: str) -> None:
        head = _dumps({"id": request_id, "object": object_name, "created": created, "model": model})
        self._prefix = b"data: " + head[:-1] + b',"choices":['
        self._suffix = b'],"usage":null,"system_fingerprint":null}\n\n'

    def choice(self, choice: dict[str, Any]) -> bytes:
        """A chunk with one choice (its dict as OpenAI spells it) and usage null."""
        return self._prefix + _dumps(choice) + self._suffix

    def usage(self, usage: Usage) -> bytes:
        """The final chunk of stream_options.include_usage: no choices, the usage."""
        return (
            self._prefix
            + b'],"usage":'
            + usage.model_dump_json().encode()
            + b',"system_fingerprint":null}\n\n'
        )


def error_event(exc: BaseException, request_id: str) -> bytes:
    """The event for an error after the stream started (the caller then sends [DONE]): the OpenAI error
    object."""
    return b"data: " + _dumps(stream_error(exc, request_id).body()) + b"\n\n"


def stream_error(exc: BaseException, request_id: str) -> APIError:
    """What a client is told of an error after its stream started: an unexpected exception is logged and
    reported without its detail."""
    if not isinstance(exc, APIError):
        tracebacks.log(log, exc, "request %s failed mid-stream", request_id)
        return internal_error(request_id)
    return exc
