"""Reading an Outcome (server/routing_compare.py) back from a response's bytes, in the format of the API
that answered: chat and completions (choices, `data:` chunks, [DONE]), Anthropic Messages (content
blocks, its event sequence) and OpenAI Responses (output items, response.* events). Finish reasons and
tool calls are read into chat terms, so a Messages answer served here compares with the same request
answered by an upstream in chat completions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from server.routes.anthropic_events import CHAT_FINISH as ANTHROPIC_FINISH
from server.routing_compare import Outcome, ToolCall


def read_outcome(
    target: str,
    status: int,
    raw: bytes,
    latency_s: float,
    ttft_s: float | None,
    api: str = "chat/completions",
) -> Outcome:
    """An Outcome from a response body of `api` (chat/completions | completions | messages | responses),
    streamed (SSE) or not."""
    out = Outcome(target, status, round(latency_s, 4), None if ttft_s is None else round(ttft_s, 4))
    if status >= 400:
        out.error = f"HTTP {status}"
        return out
    read_json, read_sse = READERS.get(api, (_read_chat_json, _read_chat_sse))
    stripped = raw.lstrip()
    if not stripped.startswith(b"{"):
        read_sse(out, raw)
        return out
    try:
        body = json.loads(stripped)
    except ValueError:
        out.error = "the response is not JSON"
        return out
    if isinstance(body, dict):
        read_json(out, body)
    return out


def _read_chat_json(out: Outcome, body: dict[str, Any]) -> None:
    choices = body.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    out.text = str(message.get("content") or choice.get("text") or "")
    out.finish_reason = choice.get("finish_reason")
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        out.tool_calls.append(ToolCall(str(function.get("name")), str(function.get("arguments") or "")))
    _read_usage(out, body.get("usage"))


def _read_usage(out: Outcome, usage: Any) -> None:
    if isinstance(usage, dict):
        out.prompt_tokens = usage.get("prompt_tokens")
        out.output_tokens = usage.get("completion_tokens")


def _read_chat_sse(out: Outcome, raw: bytes) -> None:
    text: list[str] = []
    calls: dict[int, ToolCall] = {}
    done = False
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            out.error = str((chunk["error"] or {}).get("message") or "an error event")[:200]
        _read_usage(out, chunk.get("usage"))
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text.append(str(delta.get("content") or choice.get("text") or ""))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                slot = calls.setdefault(int(call.get("index") or 0), ToolCall("", ""))
                slot.name += str(function.get("name") or "")
                slot.arguments += str(function.get("arguments") or "")
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
    if not done and out.error is None:
        out.error = "the stream ended before [DONE]"
    out.text = "".join(text)
    out.tool_calls = [calls[i] for i in sorted(calls)]


def _events(raw: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of an SSE stream's `data:` lines (Anthropic and Responses name the type inside)."""
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            try:
                event = json.loads(line[5:].strip())
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event


# -- Anthropic Messages -----------------------------------------------------------------------------------
def _read_messages_json(out: Outcome, body: dict[str, Any]) -> None:
    for block in body.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            out.text += str(block.get("text") or "")
        elif block.get("type") == "tool_use":
            out.tool_calls.append(ToolCall(str(block.get("name")), json.dumps(block.get("input") or {})))
    out.finish_reason = ANTHROPIC_FINISH.get(str(body.get("stop_reason")))
    _read_anthropic_usage(out, body.get("usage"))


def _read_anthropic_usage(out: Outcome, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    if "input_tokens" in usage:  # cache reads are counted apart from input_tokens
        out.prompt_tokens = int(usage["input_tokens"] or 0) + int(usage.get("cache_read_input_tokens") or 0)
    if "output_tokens" in usage:
        out.output_tokens = usage["output_tokens"]


def _read_messages_sse(out: Outcome, raw: bytes) -> None:
    calls: dict[int, ToolCall] = {}
    done = False
    for event in _events(raw):
        kind = event.get("type")
        if kind == "message_start":
            _read_anthropic_usage(out, (event.get("message") or {}).get("usage"))
        elif kind == "content_block_start" and (event.get("content_block") or {}).get("type") == "tool_use":
            calls[int(event.get("index") or 0)] = ToolCall(str(event["content_block"].get("name")), "")
        elif kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta":
                out.text += str(delta.get("text") or "")
            elif delta.get("type") == "input_json_delta" and int(event.get("index") or 0) in calls:
                calls[int(event.get("index") or 0)].arguments += str(delta.get("partial_json") or "")
        elif kind == "message_delta":
            out.finish_reason = ANTHROPIC_FINISH.get(str((event.get("delta") or {}).get("stop_reason")))
            _read_anthropic_usage(out, event.get("usage"))
        elif kind == "message_stop":
            done = True
        elif kind == "error":
            out.error = str((event.get("error") or {}).get("message") or "an error event")[:200]
    if not done and out.error is None:
        out.error = "the stream ended before message_stop"
    out.tool_calls = [calls[i] for i in sorted(calls)]


# -- OpenAI Responses -------------------------------------------------------------------------------------
def _read_responses_json(out: Outcome, body: dict[str, Any]) -> None:
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            out.text += "".join(
                str(p.get("text") or "") for p in item.get("content") or [] if isinstance(p, dict)
            )
        elif item.get("type") == "function_call":
            out.tool_calls.append(ToolCall(str(item.get("name")), str(item.get("arguments") or "")))
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    out.prompt_tokens, out.output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
    if body.get("status") == "failed":
        out.error = str((body.get("error") or {}).get("message") or "the response failed")[:200]
    elif body.get("status") == "incomplete":
        out.finish_reason = "length"
    else:
        out.finish_reason = "tool_calls" if out.tool_calls else "stop"


def _read_responses_sse(out: Outcome, raw: bytes) -> None:
    """The terminal event (response.completed | incomplete | failed) carries the whole response."""
    for event in _events(raw):
        if event.get("type") in ("response.completed", "response.incomplete", "response.failed"):
            _read_responses_json(out, event.get("response") or {})
            return
        if event.get("type") == "error":
            out.error = str(event.get("message") or "an error event")[:200]
            return
    out.error = "the stream ended before response.completed"


Reader = Callable[[Outcome, Any], None]
READERS: dict[str, tuple[Reader, Reader]] = {
    "messages": (_read_messages_json, _read_messages_sse),
    "responses": (_read_responses_json, _read_responses_sse),
}
