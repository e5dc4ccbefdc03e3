"""POST /v1/chat/completions: render the conversation with the model's chat template, generate, and
answer with OpenAI's chat.completion object or a stream of chat.completion.chunk events."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.asgi_body import ParsedBodyRoute
from server.chat_template import (
    add_json_object_hint,
    check_template_kwargs,
    normalize_messages,
    render_and_encode,
    select_tools,
)
from server.engine_api import Delta, Engine, GenerateRequest
from server.errors import bad_request
from server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
)
from server.request_record import request_record
from server.routes.chat_constraints import OutputPlan, resolve_output_plan, template_kwargs_for
from server.routes.chat_output import (
    MessageAccumulator,
    MessageDelta,
    OutputProcessor,
    chat_logprobs,
    glm_format_of,
    make_output_processor,
)
from server.routes.deps import (
    ServingState,
    admit,
    check_batch_size,
    check_model,
    check_prompt_tokens,
    client_of,
    get_state,
    ready_engine,
    run_in_pool,
    serve_overflow,
)
from server.routes.generation import Generation, completion_response, respond
from server.routes.sampling import check_common_fields, resolve_max_tokens, to_sampling_params
from server.routes.sse import SSE_DONE, ChunkEncoder, error_event
from server.scheduler.request import SamplingParams
from server.usage import usage_api

router = APIRouter(route_class=ParsedBodyRoute)  # large bodies parsed off the loop


@dataclass(slots=True)
class ChatContext:
    request_id: str
    created: int
    model: str
    top_logprobs: int | None  # None: no logprobs requested
    include_usage: bool
    processors: list[OutputProcessor]
    encoder: ChunkEncoder


@router.post("/v1/chat/completions", response_model=None, dependencies=[usage_api("chat")])
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    engine = ready_engine(state, allow_unhealthy=state.overflow is not None)
    model = check_model(state, body.model)
    prepared = await prepare_chat(body, engine, state)
    queued_tokens = len(prepared.prompt_ids) * body.n
    decision = admit(state, engine, request, sequences=body.n, tokens=queued_tokens)
    overflowed = await serve_overflow(
        state, engine, request, decision, path="chat/completions", prompt_tokens=len(prepared.prompt_ids),
        sequences=body.n, tokens=queued_tokens,
    )  # fmt: skip
    if overflowed is not None:
        return overflowed

    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    record = request_record(request.scope)
    record.served_locally(request_id, model, body.stream, prepared.prompt_text)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    processors = [prepared.output_processor(engine, state) for _ in range(body.n)]
    created = int(time.time())
    encoder = ChunkEncoder(request_id, "chat.completion.chunk", created, model)
    context = ChatContext(
        request_id, created, model, prepared.top_logprobs, include_usage, processors, encoder
    )
    generate_request = GenerateRequest(
        request_id,
        prepared.prompt_ids,
        prepared.params,
        n=body.n,
        arrival_time=time.monotonic(),
        client=client_of(request, request_id),
    )
    generation = Generation(engine, state.metrics, [generate_request], record, state.generations)
    return await respond(
        request, generation, request_id, stream=body.stream,
        stream_body=lambda: _stream_chunks(context, generation), complete=lambda: _complete(context, generation),
    )  # fmt: skip


@dataclass(slots=True)
class PreparedChat:
    """A chat request checked and rendered: what the engine gets and what the output parsers need. The
    Anthropic and Responses routes translate their requests into a ChatCompletionRequest and share this."""

    prompt_text: str
    prompt_ids: list[int]
    tools: list[dict[str, Any]] | None
    plan: OutputPlan  # the structured-output constraint and how tool calls are read back
    top_logprobs: int | None  # None: no logprobs requested
    params: SamplingParams

    def output_processor(self, engine: Engine, state: ServingState) -> OutputProcessor:
        return make_output_processor(
            engine.tokenizer, self.prompt_text, self.tools, self.plan, state.config.server.tool_call_parser
        )


async def prepare_chat(body: ChatCompletionRequest, engine: Engine, state: ServingState) -> PreparedChat:
    """Cross-field checks, the chat template, the output constraint, the output budget and the sampling
    params (400 on bad input)."""
    check_common_fields(body)
    if body.tools and body.tool_choice in (None, "auto") and not state.config.server.enable_auto_tool_choice:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice.', param="tool_choice")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    check_batch_size(state, prompts=1, n=body.n)
    prompt_text, prompt_ids, tools = await render_prompt(body, engine, state)
    check_prompt_tokens(state, len(prompt_ids), "messages")
    plan = resolve_output_plan(
        body, tools=tools, prompt_text=prompt_text,
        glm_format=state.config.server.tool_call_parser or glm_format_of(engine.tokenizer),
        tokenizer=engine.tokenizer,
    )  # fmt: skip
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    defaults = state.sampling_defaults
    max_tokens = resolve_max_tokens(
        requested, len(prompt_ids), engine.max_model_len, "messages", defaults.max_tokens
    )
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = to_sampling_params(
        body, max_tokens=max_tokens, logprobs=top_logprobs, defaults=defaults, structured=plan.structured
    )
    return PreparedChat(prompt_text, prompt_ids, tools, plan, top_logprobs, params)


async def render_prompt(
    body: ChatCompletionRequest, engine: Engine, state: ServingState
) -> tuple[str, list[int], list | None]:
    messages = normalize_messages(body.messages)
    add_json_object_hint(messages, body.response_format)
    tools = select_tools(body.tools, body.tool_choice)
    template_kwargs = template_kwargs_for(body, check_template_kwargs(body.chat_template_kwargs))
    prompt_text, prompt_ids = await run_in_pool(
        state, render_and_encode, engine.tokenizer, messages, tools=tools,
        add_generation_prompt=body.add_generation_prompt, template_kwargs=template_kwargs,
        special_tokens_in_content=state.config.server.special_tokens_in_content,
    )  # fmt: skip
    return prompt_text, prompt_ids, tools


def chat_finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str | None:
    if engine_reason == "stop" and has_tool_calls:
        return "tool_calls"
    return engine_reason


async def _complete(context: ChatContext, generation: Generation) -> Response:
    n = len(context.processors)
    messages = [MessageAccumulator() for _ in range(n)]
    logprobs: list[list[ChatTokenLogprob]] = [[] for _ in range(n)]
    async for delta in generation:
        processor, message = context.processors[delta.index], messages[delta.index]
        message.add(processor.feed(delta.text))
        if delta.finished:
            message.add(processor.finish())
        if context.top_logprobs is not None and delta.logprobs:
            logprobs[delta.index].extend(chat_logprobs(delta.logprobs, context.top_logprobs))
    choices = []
    for i, message in enumerate(messages):
        state = generation.choices[i]
        final = getattr(context.processors[i], "final_message", message.message)()
        choices.append(
            ChatChoice(
                index=i,
                message=final,
                logprobs=ChatLogprobs(content=logprobs[i]) if context.top_logprobs is not None else None,
                finish_reason=chat_finish_reason(state.finish_reason, bool(final.tool_calls)),
                stop_reason=state.stop_reason,
            )
        )
    response = ChatCompletionResponse(
        id=context.request_id, created=context.created, model=context.model, choices=choices,
        usage=generation.usage(),
    )  # fmt: skip
    return completion_response(response, context.request_id)


async def _stream_chunks(context: ChatContext, generation: Generation) -> AsyncIterator[bytes]:
    n = len(context.processors)
    called_tools = [False] * n
    encoder = context.encoder
    try:
        for i in range(n):
            role = {"role": "assistant", "content": ""}
            yield encoder.choice({"index": i, "delta": role, "logprobs": None, "finish_reason": None})
        async for delta in generation:
            choice = _stream_choice(context, delta, called_tools)
            if choice is not None:
                yield encoder.choice(choice)
        if context.include_usage:
            yield encoder.usage(generation.usage())
    except Exception as exc:
        yield error_event(exc, context.request_id)
    yield SSE_DONE


def _stream_choice(context: ChatContext, delta: Delta, called_tools: list[bool]) -> dict[str, Any] | None:
    processor = context.processors[delta.index]
    message: MessageDelta = processor.feed(delta.text)
    if delta.finished:
        message = message.merge(processor.finish())
    called_tools[delta.index] = called_tools[delta.index] or bool(message.tool_calls)
    logprobs = None
    if context.top_logprobs is not None and delta.logprobs:
        logprobs = {"content": [e.model_dump() for e in chat_logprobs(delta.logprobs, context.top_logprobs)]}
    if message.is_empty() and not delta.finished and logprobs is None:
        return None
    choice: dict[str, Any] = {
        "index": delta.index,
        "delta": message.to_stream_delta(),
        "logprobs": logprobs,
        "finish_reason": chat_finish_reason(delta.finish_reason, called_tools[delta.index]),
    }
    if delta.finished:
        choice["stop_reason"] = delta.stop_reason
    return choice
