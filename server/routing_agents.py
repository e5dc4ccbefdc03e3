"""Anthropic Messages and OpenAI Responses requests in the routing layer.

They are routed like chat requests (the same plan, guards, shadows and comparison rows), with two
differences: the app always serves them, because their route owns the translation (an upstream target is
reached from the route as a chat completion, or in the API's own format: server/routes/
translated_upstream.py), and the comparison reads their tools and response format in chat terms."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from server.agent_apis import AgentApisConfig, resolve_model
from server.errors import APIError
from server.protocol_anthropic import MessagesRequest
from server.protocol_responses import ResponsesRequest, chat_fields, input_messages
from server.routes.messages import chat_request, to_chat_request

TRANSLATED_APIS = ("messages", "responses")


def chat_view(api: str, body: dict[str, Any], cfg: AgentApisConfig, served: str) -> dict[str, Any] | None:
    """The request as the chat request it translates into (its tools, response_format and messages, for
    the comparison); None when the route would refuse it (an unknown model, a bad body): not routed,
    the app answers it."""
    try:
        resolve_model(cfg, served, body.get("model"))
        if api == "messages":
            chat = to_chat_request(MessagesRequest.model_validate(body))
        else:
            request = ResponsesRequest.model_validate(body)
            chat = chat_request(chat_fields(request, input_messages(request.input)))
    except (APIError, ValidationError):
        return None
    return chat.model_dump(mode="json", exclude_none=True)


def shadow_body(api: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a shadow sends through the app: streamed, and a Responses request is not stored (the client
    must not find the shadow's answer under its key)."""
    return {**body, "stream": True, **({"store": False} if api == "responses" else {})}
