"""Typing GLM tool-call argument values with the request's tool schemas, and writing arguments JSON.

GLM writes each argument as `<arg_value>V</arg_value>`, where V is the raw text of a string value and
the JSON text of any other value (the chat template applies `tojson` to non-strings). So the parameter's
JSON-schema type decides how V is read:

* "string" among its types: V verbatim, even when it looks like a number or JSON.
* integer / number / boolean / object / array / null: V is parsed as JSON, else as a Python literal
  (`{'k': 1}`, `['a']`, `None`, `True`: models write these); when both fail the raw text is kept as a
  string. A quoted number (`"5"`) becomes a number when the schema allows integer or number and not
  string. Object/array values that were string-escaped one extra time (`[{\\"id\\": 1}]`) are
  un-escaped once before giving up (models do emit this).
* no known type (tool or parameter not in the schema, or a schema without "type"): JSON if V parses as
  JSON, else a Python literal, else the raw text.

A parameter's types come from its "type", and through "$ref" (into the parameters' "$defs" /
"definitions"), "anyOf", "oneOf" and "allOf"; an enum without a type has the types of its values.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from typing import Any

STRING = "string"


class _NotJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJson(name)  # NaN / Infinity are not JSON and would produce invalid arguments


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


_ENUM_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def schema_types(schema: Any, root: Any = None, _depth: int = 0) -> frozenset[str]:
    """The JSON types a parameter schema allows: its "type" (a string or a list), those of anyOf / oneOf /
    allOf and of the schema a local "$ref" points at (in `root`), or the types of an untyped enum."""
    if not isinstance(schema, dict) or _depth > 16:
        return frozenset()
    declared = schema.get("type")
    types: set[str] = set()
    if isinstance(declared, str):
        types.add(declared)
    elif isinstance(declared, list):
        types.update(item for item in declared if isinstance(item, str))
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key) or ():
            types |= schema_types(option, root, _depth + 1)
    ref = schema.get("$ref")
    if isinstance(ref, str):
        types |= schema_types(_resolve(ref, root), root, _depth + 1)
    if not types and isinstance(schema.get("enum"), list):
        types.update(_ENUM_TYPES.get(type(value), "object") for value in schema["enum"])
    return frozenset(types)


def _resolve(ref: str, root: Any) -> Any:
    """A local JSON pointer ("#/$defs/Name") inside `root`; None when it does not resolve."""
    if not ref.startswith("#/"):
        return None
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node


class ToolSchemas:
    """Parameter types of the tools declared in a request: the OpenAI `tools` list, as dicts (pydantic
    models are dumped first); bare `{"name", "parameters"}` function dicts are accepted too."""

    __slots__ = ("_params",)

    def __init__(self, tools: Iterable[Any] | None) -> None:
        self._params: dict[str, dict[str, frozenset[str]]] = {}
        for tool in tools or ():
            if hasattr(tool, "model_dump"):  # a pydantic model of the OpenAI tool schema
                tool = tool.model_dump()
            function = tool.get("function", tool) if isinstance(tool, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                continue
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            self._params[function["name"]] = {
                key: schema_types(value, parameters) for key, value in (properties or {}).items()
            }

    def declares(self, tool_name: str) -> bool:
        return tool_name in self._params

    def types_of(self, tool_name: str, parameter: str) -> frozenset[str]:
        """The allowed types of one parameter; empty when the tool or the parameter is unknown."""
        return self._params.get(tool_name, {}).get(parameter, frozenset())


def is_string_typed(types: frozenset[str]) -> bool:
    return STRING in types


def coerce_value(raw: str, types: frozenset[str]) -> Any:
    """Turn the raw text of one `<arg_value>` into the value its schema types call for."""
    if STRING in types:
        return raw
    stripped = raw.strip()
    value = _json_or_literal(stripped)
    if value is not _NOTHING:
        if isinstance(value, str) and types & {"integer", "number"}:
            return _number(value, types)
        return value
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if types & {"object", "array"}:
        try:
            unescaped = _loads(json.loads(f'"{stripped}"', strict=False))
        except ValueError:
            unescaped = None
        if isinstance(unescaped, (dict, list)):
            return unescaped
    return raw


_NOTHING = object()


def _json_or_literal(text: str) -> Any:
    """JSON, else a Python literal whose value JSON can write; _NOTHING when neither."""
    try:
        return _loads(text)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return _NOTHING
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return _NOTHING
    return value


def _number(text: str, types: frozenset[str]) -> Any:
    """A quoted number as the number the schema asks for; the string when it is not one."""
    try:
        number = float(text)
    except ValueError:
        return text
    if number != number or number in (float("inf"), float("-inf")):
        return text
    if "integer" in types and number.is_integer() and "." not in text and "e" not in text.lower():
        return int(text)
    return number if "number" in types else text


class ArgumentsWriter:
    """Writes one call's arguments object as a sequence of JSON fragments.

    The fragments joined are exactly `json.dumps(arguments, ensure_ascii=False)` (for distinct keys), so a
    streaming client that concatenates them gets the same text as the final message.
    """

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count = 0

    def key(self, name: str) -> str:
        """The fragment that opens the object (or separates) and names the next key."""
        prefix = "{" if self._count == 0 else ", "
        self._count += 1
        return f"{prefix}{json.dumps(name, ensure_ascii=False)}: "

    @staticmethod
    def value(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    @staticmethod
    def string_piece(text: str) -> str:
        """A piece of a string value being streamed, escaped but without the surrounding quotes."""
        return json.dumps(text, ensure_ascii=False)[1:-1]

    def close(self) -> str:
        return "{}" if self._count == 0 else "}"
