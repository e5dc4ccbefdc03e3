"""tool_choice "required" / named and parallel_tool_calls false, as output constraints.

GLM templates: the model's own tool-call syntax is constrained (a Lark grammar), so the GLM parser turns
the output into tool_calls as it does for any call:

    <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>

Each tool's arguments follow its declared properties in order (required ones always, the others
optionally); a string-typed value is raw text without '<' (up to its maxLength), an enum of strings one
of its strings, any other value JSON that its own schema (with the root's $defs) constrains. GLM-4.5/4.6 templates put newlines between
the tags; GLM-4.7/GLM-5 write them inline.

Other models (SmolLM2 included) have no known tool syntax: as vLLM does, the output is constrained to a
JSON form of the call, which server/routes/chat_output.py turns into tool_calls: a named choice generates
the arguments object itself, "required" a JSON array of {"name", "parameters"} objects."""

from __future__ import annotations

import json
from typing import Any

from server.parsers.tags import CALL_CLOSE, CALL_OPEN, KEY_CLOSE, KEY_OPEN, VALUE_CLOSE, VALUE_OPEN
from server.structured_output import StructuredOutput, check, laid_out

# A raw string value: text up to the closing tag. llguidance's lexer does not backtrack, so a value that
# could go on with '<' would never see its `</arg_value>`: a constrained string value has no '<'.
STRING_VALUE = r"/[^<]+/"


GLM_TAGS = (CALL_OPEN, CALL_CLOSE, KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE)


def token_tags(tokenizer: Any) -> frozenset[str]:
    """The GLM tool-call tags that are single added tokens of this tokenizer."""
    added = getattr(tokenizer, "get_added_vocab", dict)()
    return frozenset(tag for tag in GLM_TAGS if tag in added)


def required_tools(tools: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]] | None:
    """The functions a call is forced among: all of them for "required", the named one for a named choice,
    None when no call is forced ("auto", "none", unset)."""
    if tool_choice == "required":
        return [t["function"] for t in tools]
    if isinstance(tool_choice, dict) or hasattr(tool_choice, "function"):
        name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else tool_choice.function.name
        return [t["function"] for t in tools if t["function"]["name"] == name]
    return None


def glm_tool_call_constraint(
    functions: list[dict[str, Any]], *, single: bool, fmt: str, token_tags: frozenset[str] = frozenset()
) -> StructuredOutput:
    """GLM tool-call syntax for one call (`single`) or one or more calls among `functions`. `token_tags`:
    the tags that are single added tokens of the tokenizer (GLM's are): the grammar names them as tokens,
    since llguidance does not match an added token against literal text."""
    sep = '"\\n"' if fmt == "glm45" else ""
    tags = _Tags(token_tags)
    more = f"({sep}? call)*" if sep else "call*"
    rules = ["start: call" + ("" if single else f" {more}")]
    rules.append("call: " + " | ".join(f"c{i}" for i in range(len(functions))))
    for i, function in enumerate(functions):
        rules.extend(_call_rules(i, function, sep, tags))
    rules.append(f"STR: {STRING_VALUE}")
    return check(StructuredOutput("grammar", "\n".join(rules)), "tool_choice")


class _Tags:
    def __init__(self, token_tags: frozenset[str]) -> None:
        self.token_tags = token_tags

    def __call__(self, tag: str) -> str:
        return tag if tag in self.token_tags else json.dumps(tag)


def _call_rules(i: int, function: dict[str, Any], sep: str, tag: _Tags) -> list[str]:
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or [])
    defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
    parts, rules = [], []
    for j, (key, schema) in enumerate(properties.items()):
        name = f"a{i}_{j}"
        items = [tag(KEY_OPEN), json.dumps(key), tag(KEY_CLOSE), sep, tag(VALUE_OPEN), _value(schema, defs)]
        items += [tag(VALUE_CLOSE), sep]
        rules.append(f"{name}: " + " ".join(item for item in items if item))
        parts.append(name if key in required else f"{name}?")
    head = [tag(CALL_OPEN), json.dumps(function["name"]), sep, *parts, tag(CALL_CLOSE)]
    rules.insert(0, f"c{i}: " + " ".join(item for item in head if item))
    return rules


def _value(schema: Any, defs: dict[str, Any]) -> str:
    if not isinstance(schema, dict):
        return "%json {}"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return "(" + " | ".join(json.dumps(v) for v in enum) + ")"
    declared = schema.get("type")
    if declared == "string" and "$ref" not in schema:
        longest = schema.get("maxLength")
        if isinstance(longest, int) and longest > 0:
            return f"/[^<]{{1,{longest}}}/?"
        return "STR?"
    return "%json " + json.dumps(laid_out({**schema, **defs}), ensure_ascii=False)


def json_tool_call_constraint(
    functions: list[dict[str, Any]], *, named: bool, single: bool
) -> StructuredOutput:
    """The JSON form: a named choice's arguments object, or for "required" an array of
    {"name", "parameters"} objects (one at most when `single`)."""
    if named:
        schema = functions[0].get("parameters") or {"type": "object"}
        return check(StructuredOutput("json", schema), "tool_choice")
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [f["name"]]},
                "parameters": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    for f in functions:  # "#/$defs/..." in a function's parameters now points at this root
        for key in ("$defs", "definitions"):
            schema.setdefault(key, {}).update((f.get("parameters") or {}).get(key) or {})
    if single:
        schema["maxItems"] = 1
    return check(StructuredOutput("json", schema), "tool_choice")
