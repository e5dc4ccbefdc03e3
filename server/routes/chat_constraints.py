"""What a chat request asks of its output: the structured-output constraint (response_format,
structured_outputs / guided_*, or a forced tool call) and how tool calls are read back.

resolve_output_plan() is the one place these request fields meet; an API other than chat (Messages,
Responses) builds an OutputPlan the same way from its own fields and puts `plan.structured` on the
SamplingParams of its GenerateRequest (see to_sampling_params)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from server.parsers import prompt_starts_in_reasoning
from server.parsers.tags import THINK_CLOSE
from server.protocol import ChatCompletionRequest
from server.structured_output import StructuredOutput, from_extras, from_response_format, only_one
from server.structured_output_tools import (
    glm_tool_call_constraint,
    json_tool_call_constraint,
    required_tools,
    token_tags,
)

THINKING_OFF_EFFORTS = ("none", "minimal")


@dataclass(frozen=True, slots=True)
class OutputPlan:
    structured: StructuredOutput | None  # what the engine constrains decoding to
    parse_tools: bool  # tools were offered and tool_choice is not "none": tool-call syntax becomes calls
    json_calls: Literal["named", "required"] | None = None  # a forced call in the JSON form (non-GLM)
    forced_name: str | None = None  # the named choice's function
    single_call: bool = False  # parallel_tool_calls false: at most one call


def template_kwargs_for(body: ChatCompletionRequest, kwargs: dict[str, Any]) -> dict[str, Any]:
    """reasoning_effort "none" / "minimal" turns the GLM template's thinking off (unless
    chat_template_kwargs already says)."""
    if body.reasoning_effort in THINKING_OFF_EFFORTS:
        return {"enable_thinking": False, **kwargs}
    return kwargs


def resolve_output_plan(
    body: ChatCompletionRequest,
    *,
    tools: list[dict[str, Any]] | None,
    prompt_text: str,
    glm_format: str | None,
    tokenizer: Any,
) -> OutputPlan:
    """`tools`: the tools the template rendered (None for no tools or tool_choice "none"); `glm_format`:
    the GLM tool-call layout of the model's template, None for a model without a known tool format."""
    single = body.parallel_tool_calls is False
    forced = required_tools(tools, body.tool_choice) if tools else None
    named = forced is not None and body.tool_choice != "required"
    tool_constraint = None
    if forced:
        if glm_format is not None:
            tool_constraint = glm_tool_call_constraint(
                forced, single=single or named, fmt=glm_format, token_tags=token_tags(tokenizer)
            )
        else:
            tool_constraint = json_tool_call_constraint(forced, named=named, single=single)
    extras_param, extras = from_extras(body) or ("structured_outputs", None)
    structured = only_one(
        ("tool_choice", tool_constraint),
        ("response_format", from_response_format(body.response_format)),
        (extras_param, extras),
    )
    if structured is not None and glm_format is not None and prompt_starts_in_reasoning(prompt_text):
        structured = structured.with_start(THINK_CLOSE)  # the model thinks freely, then the constraint
    json_calls: Literal["named", "required"] | None = None
    if forced and glm_format is None:
        json_calls = "named" if named else "required"
    return OutputPlan(
        structured=structured,
        parse_tools=tools is not None,
        json_calls=json_calls,
        forced_name=forced[0]["name"] if named and forced else None,
        single_call=single,
    )
