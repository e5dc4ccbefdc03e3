"""POST /v1/responses, GET and DELETE /v1/responses/{id}: the OpenAI Responses API, translated into the
chat request the chat route serves (server/routes/translated_chat.py) and answered in the Responses
format (server/routes/responses_events.py). Stored responses (server/response_store.py) belong to the
API key that created them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.agent_apis import resolve_model
from server.asgi_body import ParsedBodyRoute
from server.errors import APIError, bad_request
from server.protocol_responses import ResponsesRequest, assistant_message, chat_fields, input_messages
from server.response_store import ResponseStore
from server.routes.deps import get_state, ready_engine, request_key
from server.routes.messages import agent_apis_config, chat_request
from server.routes.responses_events import ResponsesEncoder
from server.routes.translated_chat import TranslatedRequest, serve_translated
from server.usage import usage_api

router = APIRouter(route_class=ParsedBodyRoute)  # large bodies parsed off the loop


def response_store(request: Request) -> ResponseStore:
    """The app's store of responses, opened on first use."""
    app_state = request.app.state
    if not hasattr(app_state, "response_store"):
        cfg = agent_apis_config(request)
        app_state.response_store = ResponseStore(
            cfg.resolved_path(), cfg.responses_max_stored, cfg.responses_max_age_s
        )
    return app_state.response_store


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param, code="not_found")


@router.post("/v1/responses", response_model=None, dependencies=[usage_api("responses")])
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    state = get_state(request)
    ready_engine(state, allow_unhealthy=state.overflow is not None)
    cfg = agent_apis_config(request)
    served = resolve_model(cfg, state.served_model_name, body.model)
    if body.background:
        raise bad_request("background responses are not supported by this server.", param="background")
    key_id = request_key(request).key_id
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = response_store(request).get(body.previous_response_id, key_id)
        if previous is None:
            raise not_found(body.previous_response_id, param="previous_response_id")
        history = previous.conversation
    conversation = history + input_messages(body.input)
    chat = chat_request(chat_fields(body, conversation))
    store = response_store(request) if body.store and cfg.responses_store else None

    def on_done(response: dict[str, Any]) -> None:
        if store is not None:
            store.save(key_id, response, [*conversation, assistant_message(response["output"])])

    echo = {
        "model": body.model or served, "instructions": body.instructions, "tools": body.tools or [],
        "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
        "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "previous_response_id": body.previous_response_id, "store": store is not None,
        "text": body.text or {"format": {"type": "text"}}, "reasoning": body.reasoning or {},
        "metadata": body.metadata or {}, "user": body.user, "background": False, "truncation": "disabled",
    }  # fmt: skip
    translated = TranslatedRequest(
        id_prefix="resp", chat=chat, model=served,
        make_encoder=lambda request_id: ResponsesEncoder(request_id, echo, on_done),
    )  # fmt: skip
    return await serve_translated(request, translated)


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(response_id: str, request: Request) -> Response:
    stored = response_store(request).get(response_id, request_key(request).key_id)
    if stored is None:
        raise not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, request: Request) -> Response:
    if not response_store(request).delete(response_id, request_key(request).key_id):
        raise not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
