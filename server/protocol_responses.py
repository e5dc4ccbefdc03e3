"""The OpenAI Responses API request this server accepts (POST /v1/responses), and its translation into
the chat request the chat route serves. Input items and tools are read as dicts so that an item or tool
of a type this server cannot serve is a 400 naming that type."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.errors import bad_request

THINKING_OFF_EFFORTS = ("none", "minimal")  # reasoning.effort values that turn GLM's thinking off


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None


def chat_fields(body: ResponsesRequest, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The ChatCompletionRequest fields of a Responses request; `history` is the conversation so far
    (previous_response_id's), followed by this request's input."""
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages += history
    fields: dict[str, Any] = {
        "messages": messages,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": body.stream,
        "user": body.user,
        "parallel_tool_calls": body.parallel_tool_calls,
        "tools": _tools(body.tools),
        "tool_choice": _tool_choice(body.tool_choice),
        "response_format": _response_format(body.text),
    }
    effort = (body.reasoning or {}).get("effort")
    if effort is not None:
        fields["chat_template_kwargs"] = {"enable_thinking": effort not in THINKING_OFF_EFFORTS}
    return fields


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    out = []
    for i, tool in enumerate(tools or []):
        if tool.get("type") != "function":
            raise bad_request(
                f"Tool type '{tool.get('type')}' is not supported; this server runs function tools.",
                param=f"tools.{i}.type",
            )
        function = {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None
        }
        out.append({"type": "function", "function": function})
    return out or None


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(
        f"tool_choice of type '{choice.get('type')}' is not supported; use auto, none, required or a function.",
        param="tool_choice",
    )


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat's response_format for the Responses API's text.format (json_schema is flat there: name, schema
    and strict sit beside the type)."""
    fmt = (text or {}).get("format") or {}
    kind = fmt.get("type", "text")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise bad_request(
        f"text.format of type '{kind}' is not supported (text, json_object and json_schema are).",
        param="text.format.type",
    )


# -- input items -> chat messages -------------------------------------------------------------------------
def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages from the input: a string (one user message) or items (messages, function_call,
    function_call_output, reasoning)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    reasoning: str | None = None  # a reasoning item, for the assistant turn it precedes
    for i, item in enumerate(items):
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            message = _message(item, i)
            if message["role"] == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, None
            out.append(message)
        elif kind == "function_call":
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": ""})
                if reasoning:
                    out[-1]["reasoning_content"], reasoning = reasoning, None
            call = {"name": _required(item, "name", i), "arguments": item.get("arguments") or "{}"}
            out[-1].setdefault("tool_calls", []).append(
                {"id": _required(item, "call_id", i), "type": "function", "function": call}
            )
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, i)
            out.append({"role": "tool", "tool_call_id": _required(item, "call_id", i), "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise bad_request(f"Input item type '{kind}' is not supported.", param=f"input.{i}.type")
    return out


def _required(item: dict[str, Any], name: str, index: int) -> Any:
    if not isinstance(item.get(name), str):
        raise bad_request(f"Input item {index} needs a string '{name}'.", param=f"input.{index}.{name}")
    return item[name]


def _message(item: dict[str, Any], index: int) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise bad_request(f"Input message role '{role}' is not supported.", param=f"input.{index}.role")
    content = item.get("content")
    return {"role": role, "content": content if isinstance(content, str) else _text(content, index)}


def _text(parts: Any, index: int) -> str:
    texts = []
    for j, part in enumerate(parts or []):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise bad_request(
                f"Content part type '{kind}' is not supported; this server accepts text.",
                param=f"input.{index}.content.{j}.type",
            )
    return "\n".join(texts)


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response's output items as the assistant turn a continuation (previous_response_id) renders."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "reasoning":
            message["reasoning_content"] = "".join(s["text"] for s in item["summary"])
        elif item["type"] == "message":
            message["content"] += "".join(p["text"] for p in item["content"])
        elif item["type"] == "function_call":
            call = {"name": item["name"], "arguments": item["arguments"]}
            message.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": call}
            )
    return message
