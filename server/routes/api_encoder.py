"""What an API's wire format has to provide for serve_translated (server/routes/translated_chat.py): an
ApiEncoder turns parsed output (MessageDeltas, then an Outcome) into the API's stream events, or the final
assistant message into its response object. The same encoder serves local and overflowed requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from server.errors import APIError
from server.protocol import AssistantMessage
from server.routes.chat_output import MessageDelta


@dataclass(slots=True)
class Outcome:
    """How a generation ended, in chat terms, with its token counts."""

    finish_reason: str | None  # stop | length | tool_calls | None (ended otherwise)
    stop_reason: int | str | None  # the matched stop string (str) or stop token id (int), if any
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    reasoning_tokens: int = 0


class ApiEncoder(Protocol):
    """One response of an API, as stream events (start, delta..., finish) or as one object (complete)."""

    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes:
        """The opening events; the prompt's token counts are known (the final ones come with finish)."""
        ...

    def delta(self, delta: MessageDelta) -> bytes: ...

    def finish(self, outcome: Outcome) -> bytes: ...

    def error(self, error: APIError) -> bytes: ...

    def keepalive(self) -> bytes: ...

    def complete(self, message: AssistantMessage, outcome: Outcome) -> dict[str, Any]: ...


EncoderFactory = Callable[[str], ApiEncoder]  # the request id -> the encoder of that response
