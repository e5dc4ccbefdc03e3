"""What a response said (an Outcome, read back from its bytes by server/routing_read.py), and how two of
them compare: tool-call agreement, JSON validity, and token-level ROUGE-L (no model involved)."""

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
    """One target's answer to one request (choice 0), in chat terms whatever the API: finish_reason is
    stop | length | tool_calls, tool calls are (name, JSON arguments)."""

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
