"""POST /tokenize and /detokenize, as vLLM's server has them: a prompt is tokenized as /v1/completions
does, messages as /v1/chat/completions does, so clients can count tokens exactly as usage will."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.asgi_body import ParsedBodyRoute
from server.chat_template import encode_prompt, normalize_messages, render_and_encode, select_tools
from server.engine_api import Engine
from server.errors import bad_request
from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.routes.deps import check_model, get_state, ready_engine, run_in_pool

router = APIRouter(route_class=ParsedBodyRoute)  # large bodies parsed off the loop


@router.post("/tokenize", response_model=None)
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    state = get_state(request)
    engine = ready_engine(state)
    check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("Give exactly one of 'prompt' or 'messages'.", param="prompt")
    special_in_content = state.config.server.special_tokens_in_content
    content = await run_in_pool(state, _tokenize_json, engine, body, special_in_content)
    return Response(content, media_type="application/json")


def _tokenize_json(engine: Engine, body: TokenizeRequest, special_tokens_in_content: bool) -> str:
    """The whole answer, built in the front-end pool: a long prompt's token list is costly to serialize."""
    if body.messages is not None:
        _, tokens = render_and_encode(
            engine.tokenizer, normalize_messages(body.messages), tools=select_tools(body.tools, None),
            add_generation_prompt=body.add_generation_prompt, template_kwargs=body.chat_template_kwargs,
            special_tokens_in_content=special_tokens_in_content,
        )  # fmt: skip
        if body.add_special_tokens:
            tokens = _with_special_tokens(engine.tokenizer, tokens)
    else:
        add_special = body.add_special_tokens is not False
        tokens = encode_prompt(engine.tokenizer, body.prompt or "", add_special_tokens=add_special)
    token_strs = engine.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    result = TokenizeResponse(
        count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=token_strs
    )
    return result.model_dump_json()


@router.post("/detokenize", response_model=None)
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    state = get_state(request)
    engine = ready_engine(state)
    check_model(state, body.model)
    vocab_size = len(engine.tokenizer)
    if any(not 0 <= t < vocab_size for t in body.tokens):
        raise bad_request(f"Token ids must be in [0, {vocab_size}).", param="tokens")
    text = await run_in_pool(state, engine.tokenizer.decode, body.tokens)
    return Response(DetokenizeResponse(prompt=text).model_dump_json(), media_type="application/json")


def _with_special_tokens(tokenizer: Any, ids: list[int]) -> list[int]:
    """ids wrapped in what add_special_tokens=True adds around any text (e.g. a BOS token)."""
    plain = tokenizer.encode("x", add_special_tokens=False)
    wrapped = tokenizer.encode("x", add_special_tokens=True)
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start] + ids + wrapped[start + len(plain) :]
    return ids
