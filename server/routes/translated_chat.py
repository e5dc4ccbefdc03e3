"""Serving another API's request (Anthropic Messages, OpenAI Responses) as the chat completion it
translates into.

A route turns its body into a ChatCompletionRequest (the internal request) and an ApiEncoder (its wire
format); serve_translated() does the rest exactly as the chat route does: the same checks, chat template,
output budget and sampling params (prepare_chat), admission and overflow, one engine generation with its
metrics and usage (Generation), and the GLM output parser. Only the encoder differs per API: it turns
the parsed MessageDeltas into the API's stream events, or the final message into its response object.
An overflowed request, or one that routing sends to an upstream target, goes upstream as that chat
completion and comes back through the same encoder (server/routes/translated_upstream.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from server.engine_api import Delta, GenerateRequest
from server.parsers import prompt_starts_in_reasoning
from server.protocol import ChatCompletionRequest
from server.request_record import request_record
from server.routes.api_encoder import ApiEncoder, EncoderFactory, Outcome
from server.routes.chat import chat_finish_reason, prepare_chat
from server.routes.chat_output import MessageAccumulator, MessageDelta, OutputProcessor
from server.routes.deps import admit, client_of, get_state, ready_engine, serve_overflow
from server.routes.generation import Generation, respond
from server.routes.reasoning_budget import ReasoningBudget
from server.routes.sse import stream_error
from server.routes.translated_upstream import serve_on_target, upstream_call
from server.routing_targets import ROUTE_TARGET

KEEPALIVE_S = 10.0  # a stream silent this long gets the API's keep-alive event (Anthropic: ping)


@dataclass(slots=True)
class TranslatedRequest:
    id_prefix: str  # msg | resp
    chat: ChatCompletionRequest  # the internal request (its model is the served one, or None)
    model: str  # the served model's name (the ledger's); the encoder names the model the client asked for
    make_encoder: EncoderFactory
    reasoning_budget: int | None = None  # at most this many reasoning tokens (routes/reasoning_budget.py)
    # the request as the client sent it, for an upstream that speaks its API (Messages: anthropic_base_url)
    native_body: dict[str, Any] | None = None


async def serve_translated(request: Request, translated: TranslatedRequest) -> Response:
    state = get_state(request)
    engine = ready_engine(state, allow_unhealthy=state.overflow is not None)
    chat = translated.chat
    prepared = await prepare_chat(chat, engine, state)
    body = chat.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    target = request.scope.get("state", {}).get(ROUTE_TARGET)
    if target is not None:  # routing sends it to an upstream target (server/routing_agents.py)
        return await serve_on_target(target, request, translated, body, len(prepared.prompt_ids))
    queued_tokens = len(prepared.prompt_ids)
    decision = admit(state, engine, request, sequences=1, tokens=queued_tokens)
    native = getattr(state.overflow, "messages_client", None) is not None
    path, body, translation = upstream_call(translated, body, native, request.url.path)
    overflowed = await serve_overflow(
        state, engine, request, decision, path=path, prompt_tokens=len(prepared.prompt_ids),
        sequences=1, tokens=queued_tokens, id_prefix=translated.id_prefix, body=body, translation=translation,
    )  # fmt: skip
    if overflowed is not None:
        return overflowed

    request_id = f"{translated.id_prefix}_{uuid.uuid4().hex}"
    record = request_record(request.scope)
    record.served_locally(request_id, translated.model, chat.stream, prepared.prompt_text)
    processor = prepared.output_processor(engine, state)
    generate_request = GenerateRequest(
        request_id,
        prepared.prompt_ids,
        prepared.params,
        arrival_time=time.monotonic(),
        client=client_of(request, request_id),
    )
    budget = translated.reasoning_budget
    runs = (
        engine
        if budget is None or not prompt_starts_in_reasoning(prepared.prompt_text)
        else ReasoningBudget(engine, budget)
    )
    generation = Generation(runs, state.metrics, [generate_request], record, state.generations)
    encoder = translated.make_encoder(request_id)
    output = _Output(processor)
    return await respond(
        request, generation, request_id, stream=chat.stream,
        stream_body=lambda: _stream(encoder, output, generation, request_id),
        complete=lambda: _complete(encoder, output, generation, request_id),
    )  # fmt: skip


class _Output:
    """The parser's view of one choice, with what the outcome needs: tool calls seen, reasoning tokens."""

    def __init__(self, processor: OutputProcessor) -> None:
        self.processor = processor
        self.called_tools = False
        self.reasoning_tokens = 0

    def feed(self, delta: Delta) -> MessageDelta:
        message = self.processor.feed(delta.text)
        if delta.finished:
            message = message.merge(self.processor.finish())
        self.called_tools = self.called_tools or bool(message.tool_calls)
        if message.reasoning_content:
            self.reasoning_tokens = delta.num_output_tokens
        return message

    def outcome(self, generation: Generation) -> Outcome:
        choice = generation.choices[0]
        usage = generation.usage()
        return Outcome(
            finish_reason=chat_finish_reason(choice.finish_reason, self.called_tools),
            stop_reason=choice.stop_reason,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0,
            reasoning_tokens=min(self.reasoning_tokens, usage.completion_tokens),
        )


async def _stream(
    encoder: ApiEncoder, output: _Output, generation: Generation, request_id: str
) -> AsyncIterator[bytes]:
    try:
        yield encoder.start(generation.prompt_tokens[0], generation.cached_tokens[0])
        async for delta in with_keepalive(generation, KEEPALIVE_S):
            if delta is None:
                yield encoder.keepalive()
                continue
            message = output.feed(delta)
            if not message.is_empty():
                yield encoder.delta(message)
            if delta.finished:
                yield encoder.finish(output.outcome(generation))
                return  # nothing follows the API's last event
    except Exception as exc:
        yield encoder.error(stream_error(exc, request_id))


async def _complete(
    encoder: ApiEncoder, output: _Output, generation: Generation, request_id: str
) -> Response:
    accumulator = MessageAccumulator()
    async for delta in generation:
        accumulator.add(output.feed(delta))
    final = getattr(output.processor, "final_message", accumulator.message)()
    body = encoder.complete(final, output.outcome(generation))
    return JSONResponse(body, headers={"X-Request-Id": request_id})


_END = object()


async def _next_or_end(iterator: Any) -> Any:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return _END


async def with_keepalive(source: Any, interval_s: float) -> AsyncIterator[Any]:
    """The items of an async iterator, with None yielded whenever none has come for interval_s."""
    iterator = aiter(source)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next_or_end(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            item, pending = pending.result(), None
            if item is _END:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
