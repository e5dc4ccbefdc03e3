"""The OpenAI Responses wire format: the response object, and its stream of events

    response.created, response.in_progress,
    per output item: response.output_item.added, its parts and deltas, response.output_item.done,
    response.completed | response.incomplete (max_output_tokens reached) | response.failed

Output items: `reasoning` (GLM's reasoning as summary text), `message` (output_text) and `function_call`
(call_id, name, arguments streamed as deltas). Each event carries a sequence_number."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from server.errors import APIError
from server.protocol import AssistantMessage
from server.routes.api_encoder import Outcome
from server.routes.chat_output import MessageDelta


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "input_tokens": outcome.prompt_tokens,
        "input_tokens_details": {"cached_tokens": outcome.cached_tokens},
        "output_tokens": outcome.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": outcome.reasoning_tokens},
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


class ResponsesEncoder:
    """`echo`: the request fields a response object repeats (model, instructions, tools, tool_choice...).
    `on_done` gets the final response object (to store it)."""

    def __init__(
        self, request_id: str, echo: dict[str, Any], on_done: Callable[[dict[str, Any]], None]
    ) -> None:
        self.response: dict[str, Any] = {
            "id": request_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "error": None, "incomplete_details": None, "output": [], "usage": None, **echo,
        }  # fmt: skip
        self._on_done = on_done
        self._sequence = 0
        self._item: dict[str, Any] | None = None  # the open output item

    # -- the whole response ---------------------------------------------------------------------------
    def complete(self, message: AssistantMessage, outcome: Outcome) -> dict[str, Any]:
        output = self.response["output"]
        if message.reasoning_content:
            text = message.reasoning_content
            output.append({"id": _item_id("rs"), "type": "reasoning",
                           "summary": [{"type": "summary_text", "text": text}]})  # fmt: skip
        if message.content:
            output.append(self._message_item(message.content, "completed"))
        for call in message.tool_calls or []:
            output.append(self._call_item(call.id, call.function.name, call.function.arguments, "completed"))
        self._settle(outcome)
        return self.response

    # -- the stream -----------------------------------------------------------------------------------
    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes:
        snapshot = dict(self.response)
        return self._event("response.created", response=snapshot) + self._event(
            "response.in_progress", response=snapshot
        )

    def keepalive(self) -> bytes:
        return b": keep-alive\n\n"

    def delta(self, delta: MessageDelta) -> bytes:
        out: list[bytes] = []
        if delta.reasoning_content:
            if self._open_kind() != "reasoning":
                out += self._open({"id": _item_id("rs"), "type": "reasoning", "summary": []})
                out.append(self._item_event("response.reasoning_summary_part.added", summary_index=0,
                                            part={"type": "summary_text", "text": ""}))  # fmt: skip
                self._item["_text"] = ""
            self._item["_text"] += delta.reasoning_content
            out.append(self._item_event("response.reasoning_summary_text.delta", summary_index=0,
                                        delta=delta.reasoning_content))  # fmt: skip
        if delta.content:
            if self._open_kind() != "message":
                out += self._open(self._message_item("", "in_progress", content=[]))
                part = {"type": "output_text", "text": "", "annotations": []}
                out.append(self._item_event("response.content_part.added", content_index=0, part=part))
                self._item["_text"] = ""
            self._item["_text"] += delta.content
            out.append(self._item_event("response.output_text.delta", content_index=0, delta=delta.content,
                                        logprobs=[]))  # fmt: skip
        for call in delta.tool_calls:
            function = call.function
            if call.id is not None:
                name = (function.name if function is not None else None) or ""
                out += self._open(self._call_item(call.id, name, "", "in_progress"))
            if function is not None and function.arguments and self._open_kind() == "function_call":
                self._item["arguments"] += function.arguments
                out.append(
                    self._item_event("response.function_call_arguments.delta", delta=function.arguments)
                )
        return b"".join(out)

    def finish(self, outcome: Outcome) -> bytes:
        out = b"".join(self._close())
        self._settle(outcome)
        kind = "response.incomplete" if self.response["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=self.response)

    def error(self, error: APIError) -> bytes:
        out = b"".join(self._close())
        self.response.update(
            status="failed", error={"code": error.code or "server_error", "message": error.message}
        )
        return out + self._event("response.failed", response=self.response)

    # -- helpers ----------------------------------------------------------------------------------------
    def _settle(self, outcome: Outcome) -> None:
        incomplete = outcome.finish_reason == "length"
        self.response.update(
            status="incomplete" if incomplete else "completed",
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            usage=usage(outcome),
        )
        self._on_done(self.response)

    @staticmethod
    def _message_item(text: str, status: str, content: list | None = None) -> dict[str, Any]:
        parts = [{"type": "output_text", "text": text, "annotations": []}] if content is None else content
        return {
            "id": _item_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": parts,
        }

    @staticmethod
    def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {"id": _item_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}  # fmt: skip

    def _open_kind(self) -> str | None:
        return self._item["type"] if self._item is not None else None

    def _open(self, item: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._item = item
        return [*out, self._event("response.output_item.added", output_index=len(self.response["output"]),
                                  item=item)]  # fmt: skip

    def _close(self) -> list[bytes]:
        item, self._item = self._item, None
        if item is None:
            return []
        self._item = item  # the events below name it
        text = item.pop("_text", "")
        out = []
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            out.append(self._item_event("response.reasoning_summary_text.done", summary_index=0, text=text))
            out.append(self._item_event("response.reasoning_summary_part.done", summary_index=0, part=part))
            item["summary"] = [part]
        elif item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            out.append(self._item_event("response.output_text.done", content_index=0, text=text, logprobs=[]))
            out.append(self._item_event("response.content_part.done", content_index=0, part=part))
            item.update(content=[part], status="completed")
        else:
            out.append(self._item_event("response.function_call_arguments.done", arguments=item["arguments"],
                                        name=item["name"]))  # fmt: skip
            item["status"] = "completed"
        out.append(
            self._event("response.output_item.done", output_index=len(self.response["output"]), item=item)
        )
        self.response["output"].append(item)
        self._item = None
        return out

    def _item_event(self, event_type: str, **fields: Any) -> bytes:
        assert self._item is not None
        return self._event(
            event_type, item_id=self._item["id"], output_index=len(self.response["output"]), **fields
        )

    def _event(self, event_type: str, **fields: Any) -> bytes:
        data = {"type": event_type, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return f"event: {event_type}\ndata: {payload}\n\n".encode()
