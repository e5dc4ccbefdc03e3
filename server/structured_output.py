"""Structured outputs: what a request asks the output to match, checked before any token is generated.

A request names its constraint in one of several OpenAI / vLLM shapes (response_format, structured_outputs,
the older guided_* fields, or a tool_choice that forces a call). They all become one StructuredOutput on
the request's SamplingParams, which both engines honour: the native engine compiles it with llguidance
(server/structured_output_matcher.py) and masks the logits with it every step; the vLLM backend maps it
to vLLM's StructuredOutputsParams. llguidance was chosen over xgrammar by measurement
(benchmarks/RESULTS.md, "Structured outputs") and because its Lark grammars embed JSON schemas, which the
GLM tool-call grammar needs (server/structured_output_tools.py).

`starts_after` makes a constraint reasoning-aware: the output is free until that text has been generated
(a GLM template's `</think>`), and constrained from there on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from server.errors import bad_request

# JSON is written as json.dumps writes it ({"a": 1, "b": [1, 2]}): no free whitespace, in which small
# models loop until max_tokens (vLLM's disable_any_whitespace).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """One output constraint. `value`: a JSON schema (dict) for "json", a regex for "regex", the allowed
    strings for "choice", a Lark grammar (llguidance's dialect, which vLLM's guidance backend reads too)
    for "grammar", None for "json_object". Frozen and hashable through `key` (the compiled-grammar cache)."""

    kind: Kind
    value: Any = None
    starts_after: str | None = None

    @property
    def key(self) -> str:
        return json.dumps([self.kind, self.value], sort_keys=True, ensure_ascii=False)

    def with_start(self, starts_after: str | None) -> StructuredOutput:
        return StructuredOutput(self.kind, self.value, starts_after)


def closed_schema(schema: Any) -> Any:
    """The schema with every object that declares its properties closed to others (additionalProperties
    false unless the schema says otherwise), as vLLM's default xgrammar backend compiles schemas (its
    strict mode): left open, a small model keeps inventing keys until max_tokens."""
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_schema(value) for key, value in schema.items()}
    if "properties" in schema and not {"additionalProperties", "patternProperties"} & schema.keys():
        closed["additionalProperties"] = False
    return closed


def laid_out(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema as every grammar here compiles it: closed, with the JSON layout for llguidance
    (x-guidance), so both engines and the tool-call grammars write the same JSON."""
    return {**closed_schema(schema), "x-guidance": JSON_LAYOUT}


def laid_out_schema(constraint: StructuredOutput) -> dict[str, Any]:
    """The JSON schema a json or json_object constraint compiles."""
    return laid_out(constraint.value if constraint.kind == "json" else {"type": "object"})


def llguidance_grammar(constraint: StructuredOutput) -> str:
    """The constraint as an llguidance grammar (what LLMatcher compiles)."""
    import llguidance

    kind, value = constraint.kind, constraint.value
    if kind in ("json", "json_object"):
        return llguidance.LLMatcher.grammar_from_json_schema(laid_out_schema(constraint))
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    return llguidance.LLMatcher.grammar_from_lark(value)


def grammar_error(constraint: StructuredOutput) -> str | None:
    """Why llguidance cannot compile this constraint (unsupported schema keyword, bad regex, bad grammar),
    or None when it can."""
    import llguidance

    try:
        grammar = llguidance_grammar(constraint)
    except (ValueError, TypeError) as exc:
        return str(exc)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else None


def check(constraint: StructuredOutput, param: str) -> StructuredOutput:
    """The constraint, or a 400 naming `param` when it is malformed or cannot be compiled."""
    if constraint.kind == "json" and not isinstance(constraint.value, dict):
        raise bad_request(f"'{param}' must be a JSON schema object.", param=param)
    if constraint.kind in ("regex", "grammar") and not (
        isinstance(constraint.value, str) and constraint.value
    ):
        raise bad_request(f"'{param}' must be a non-empty string.", param=param)
    if constraint.kind == "choice" and not (
        isinstance(constraint.value, list)
        and constraint.value
        and all(isinstance(c, str) and c for c in constraint.value)
    ):
        raise bad_request(f"'{param}' must be a non-empty list of non-empty strings.", param=param)
    error = grammar_error(constraint)
    if error is not None:
        raise bad_request(f"'{param}' cannot be used for structured output: {error}", param=param)
    return constraint


def from_response_format(response_format: Any) -> StructuredOutput | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema {name, schema, strict}."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput("json_object")
    spec = response_format.json_schema
    if spec is None:
        raise bad_request(
            "response_format of type 'json_schema' needs a 'json_schema' object.",
            param="response_format.json_schema",
        )
    schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
    return check(StructuredOutput("json", schema), "response_format.json_schema.schema")


def from_extras(body: Any) -> tuple[str, StructuredOutput] | None:
    """vLLM's structured_outputs {json | regex | choice | grammar | json_object} and the older guided_*
    fields, with the parameter that gave it; at most one constraint may be given."""
    found: list[tuple[str, StructuredOutput]] = []
    extras = body.structured_outputs
    if extras is not None:
        for kind in KINDS:
            value = getattr(extras, kind)
            if kind == "json_object":
                if value:
                    found.append(("structured_outputs.json_object", StructuredOutput("json_object")))
            elif value is not None:
                found.append((f"structured_outputs.{kind}", _parsed(kind, value)))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            found.append((f"guided_{kind}", _parsed(kind, value)))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(param for param, _ in found)
        raise bad_request(
            f"Only one structured-output constraint may be given; got {names}.", param=found[1][0]
        )
    param, constraint = found[0]
    return param, check(constraint, param)


def _parsed(kind: str, value: Any) -> StructuredOutput:
    if kind == "json" and isinstance(value, str):  # vLLM accepts the schema as a JSON string too
        try:
            value = json.loads(value)
        except ValueError:
            pass  # check() names the parameter
    return StructuredOutput(kind, value)  # type: ignore[arg-type]


def only_one(*constraints: tuple[str, StructuredOutput | None]) -> StructuredOutput | None:
    """The one constraint given among several request fields, or a 400 naming the second one."""
    given = [(param, c) for param, c in constraints if c is not None]
    if len(given) > 1:
        raise bad_request(
            f"'{given[0][0]}' and '{given[1][0]}' both constrain the output; give one.", param=given[1][0]
        )
    return given[0][1] if given else None


def reasoning_prefixed_lark(constraint: StructuredOutput, think_close_is_token: bool) -> str | None:
    """For an engine that cannot start a constraint late (vLLM without a reasoning parser): the
    constraint as a Lark grammar that first lets the reasoning run free up to `starts_after`. None for a
    user-written grammar (it is used as given) or a constraint without `starts_after`."""
    if constraint.starts_after is None:
        return None
    kind, value = constraint.kind, constraint.value
    if kind in ("json", "json_object"):
        body = "%json " + json.dumps(laid_out_schema(constraint))
    elif kind == "regex":
        body = "/" + value.replace("/", "\\/") + "/"
    elif kind == "choice":
        body = "(" + " | ".join(json.dumps(c) for c in value) + ")"
    elif constraint.value.startswith("start: "):  # the tool-call grammars of structured_output_tools
        body = "body_start"
        value = value.replace("start: ", "body_start: ", 1)
    else:
        return None
    if think_close_is_token:  # text never matches the token: free text up to it
        rules = [f"start: REASONING? {constraint.starts_after} body", r"REASONING: /(?s:.+)/"]
    else:  # free text up to the first occurrence of the closing text
        rules = ["start: reasoning body", f"reasoning[stop={json.dumps(constraint.starts_after)}]: /(?s:.*)/"]
    rules.append(f"body: {body}")
    if body == "body_start":
        rules.append(value)
    return "\n".join(rules)
