"""POST /v1/messages and /v1/messages/count_tokens: the Anthropic Messages API, translated into the chat
request the chat route serves (server/routes/translated_chat.py) and answered in Anthropic's format
(server/routes/anthropic_events.py). Keys come as `x-api-key` or `Authorization: Bearer` (app.py);
`anthropic-version` is accepted whatever its value; errors take Anthropic's shape (errors.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from server.agent_apis import AgentApisConfig, parse_agent_apis_config, resolve_model
from server.asgi_body import ParsedBodyRoute
from server.errors import bad_request
from server.protocol import ChatCompletionRequest
from server.protocol_anthropic import (
    CountTokensRequest,
    MessageParam,
    MessagesRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from server.routes.anthropic_events import AnthropicEncoder
from server.routes.chat import render_prompt
from server.routes.deps import get_state, ready_engine
from server.routes.translated_chat import TranslatedRequest, serve_translated
from server.usage import usage_api

router = APIRouter(route_class=ParsedBodyRoute)  # large bodies parsed off the loop


def agent_apis_config(request: Request) -> AgentApisConfig:
    """The `agent_apis:` section, parsed once per app."""
    app_state = request.app.state
    if not hasattr(app_state, "agent_apis"):
        app_state.agent_apis = parse_agent_apis_config(get_state(request).config.extra.get("agent_apis"))
    return app_state.agent_apis


@router.post("/v1/messages", response_model=None, dependencies=[usage_api("messages")])
async def create_message(body: MessagesRequest, request: Request) -> Response:
    state = get_state(request)
    ready_engine(state, allow_unhealthy=state.overflow is not None)
    served = resolve_model(agent_apis_config(request), state.served_model_name, body.model)
    thinking = body.thinking
    budget = thinking.budget_tokens if thinking is not None and thinking.type == "enabled" else None
    if budget is not None and budget >= body.max_tokens:
        raise bad_request("`max_tokens` must be greater than `thinking.budget_tokens`.", param="max_tokens")
    translated = TranslatedRequest(
        id_prefix="msg", chat=to_chat_request(body), model=served,
        make_encoder=lambda request_id: AnthropicEncoder(request_id, body.model), reasoning_budget=budget,
        native_body=await request.json(),
    )  # fmt: skip
    return await serve_translated(request, translated)


@router.post("/v1/messages/count_tokens", response_model=None)
async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
    state = get_state(request)
    engine = ready_engine(state)
    resolve_model(agent_apis_config(request), state.served_model_name, body.model)
    _, prompt_ids, _ = await render_prompt(to_chat_request(body), engine, state)
    return JSONResponse({"input_tokens": len(prompt_ids)})


# -- the translation --------------------------------------------------------------------------------------
def to_chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat request an Anthropic request means (model None: it is resolved already)."""
    messages: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "\n".join(b.text for b in body.system)
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        messages.extend(_chat_messages(message, i))
    thinking = body.thinking is not None and body.thinking.type == "enabled"
    fields: dict[str, Any] = {
        "messages": messages,
        "chat_template_kwargs": {"enable_thinking": thinking},
        **_tool_fields(body),
    }
    if isinstance(body, MessagesRequest):
        fields.update(
            max_tokens=body.max_tokens, stream=body.stream, stop=body.stop_sequences,
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            user=body.metadata.user_id if body.metadata else None,
        )  # fmt: skip
    return chat_request(fields)


def chat_request(fields: dict[str, Any]) -> ChatCompletionRequest:
    """A ChatCompletionRequest from translated fields; what it refuses is a 400 naming the field."""
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "the request"
        raise bad_request(
            f"Invalid value for '{where}': {first.get('msg', 'invalid')}.", param=where
        ) from None


def _tool_fields(body: CountTokensRequest) -> dict[str, Any]:
    tools = []
    for i, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise bad_request(
                f"Tool type '{tool.type}' is not supported; this server runs custom tools (with input_schema).",
                param=f"tools.{i}.type",
            )
        function = {"name": tool.name, "description": tool.description, "parameters": tool.input_schema}
        tools.append({"type": "function", "function": function})
    choice = body.tool_choice
    if choice is None or not tools:
        return {"tools": tools or None}
    fields: dict[str, Any] = {"tools": tools, "parallel_tool_calls": not choice.disable_parallel_tool_use}
    if choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice of type 'tool' needs a 'name'.", param="tool_choice.name")
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return fields


def _chat_messages(message: MessageParam, index: int) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant_message(message, index)]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            text = block.text()
            out.append(
                {"role": "tool", "tool_call_id": block.tool_use_id,
                 "content": f"Error: {text}" if block.is_error else text}
            )  # fmt: skip
        elif block.type != "redacted_thinking":
            raise bad_request(
                f"A user message cannot hold a '{block.type}' block.",
                param=f"messages.{index}.content.{j}.type",
            )
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant_message(message: MessageParam, index: int) -> dict[str, Any]:
    texts, reasoning, calls = [], [], []
    for j, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append({"id": block.id, "type": "function",
                          "function": {"name": block.name, "arguments": block.input}})  # fmt: skip
        elif block.type == "thinking":
            reasoning.append(block.thinking)
        elif block.type == "tool_result":
            raise bad_request(
                "An assistant message cannot hold a 'tool_result' block.",
                param=f"messages.{index}.content.{j}.type",
            )
    chat: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        chat["reasoning_content"] = "".join(reasoning)
    if calls:
        chat["tool_calls"] = calls
    return chat
