"""What a response said, read back from its bytes (a JSON body or an SSE stream), and how two of them
compare: tool-call agreement, JSON validity, and token-level ROUGE-L (no model involved)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

MAX_SIMILARITY_TOKENS = 2000  # ROUGE-L is O(n*m): longer outputs are compared on their first tokens


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str


@dataclass(slots=True)
class Outcome:
    """One target's answer to one request (choice 0)."""

    target: str
    status: int  # HTTP status; 0: no answer (connection failed, timed out)
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    error: str | None = None  # an error status, an error event in the stream, or no answer

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


def read_outcome(target: str, status: int, raw: bytes, latency_s: float, ttft_s: float | None) -> Outcome:
    """An Outcome from a response body, streamed (SSE) or not."""
    out = Outcome(target, status, round(latency_s, 4), None if ttft_s is None else round(ttft_s, 4))
    if status >= 400:
        out.error = f"HTTP {status}"
        return out
    stripped = raw.lstrip()
    if stripped.startswith(b"{"):
        _read_json(out, stripped)
    else:
        _read_sse(out, raw)
    return out


def _read_json(out: Outcome, raw: bytes) -> None:
    try:
        body = json.loads(raw)
    except ValueError:
        out.error = "the response is not JSON"
        return
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


def _read_sse(out: Outcome, raw: bytes) -> None:
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


# -- checks -----------------------------------------------------------------------------------------------
def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments or "{}")
    except ValueError:
        return None


def tool_calls_valid(outcome: Outcome, tools: list[dict[str, Any]] | None) -> bool | None:
    """Every tool call names a requested tool and its arguments are JSON matching the tool's schema;
    None when the request asked for no tools."""
    if not tools:
        return None
    schemas = {
        (t.get("function") or {}).get("name"): (t.get("function") or {}).get("parameters") or {}
        for t in tools
        if isinstance(t, dict)
    }
    for call in outcome.tool_calls:
        arguments = _arguments(call)
        if call.name not in schemas or not isinstance(arguments, dict):
            return False
        if not _matches(arguments, schemas[call.name]):
            return False
    return True


def tool_calls_agree(primary: Outcome, candidate: Outcome, tools: list[dict[str, Any]] | None) -> bool | None:
    """Same function names in the same order, arguments equal as JSON, both schema-valid; None when the
    request asked for no tools."""
    if not tools:
        return None
    if [c.name for c in primary.tool_calls] != [c.name for c in candidate.tool_calls]:
        return False
    if [_arguments(c) for c in primary.tool_calls] != [_arguments(c) for c in candidate.tool_calls]:
        return False
    return bool(tool_calls_valid(primary, tools) and tool_calls_valid(candidate, tools))


def json_valid(outcome: Outcome, response_format: Any) -> bool | None:
    """Does the content parse as JSON (and match the schema of a json_schema format)? None when no JSON
    response_format was asked."""
    if not isinstance(response_format, dict) or response_format.get("type") not in (
        "json_object",
        "json_schema",
    ):
        return None
    try:
        value = json.loads(outcome.text)
    except ValueError:
        return False
    if response_format["type"] == "json_object":
        return isinstance(value, dict)
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    return _matches(value, schema)


def _matches(value: Any, schema: Any) -> bool:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:
        return True  # the request's schema is broken: the output is not to blame
    return True


def rouge_l(reference: str, candidate: str) -> float:
    """Token-level ROUGE-L F1 (whitespace tokens, longest common subsequence); 1.0 for two empty texts."""
    a, b = reference.split()[:MAX_SIMILARITY_TOKENS], candidate.split()[:MAX_SIMILARITY_TOKENS]
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(b), lcs / len(a)
    return round(2 * precision * recall / (precision + recall), 4)
