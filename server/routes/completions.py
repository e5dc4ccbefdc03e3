"""POST /v1/completions: a prompt (text, token ids, or a batch of either) in, text_completion out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.asgi_body import ParsedBodyRoute
from server.chat_template import encode_prompt
from server.engine_api import GenerateRequest, TokenLogprob
from server.errors import bad_request
from server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from server.request_record import request_record
from server.routes.deps import (
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
from server.usage import usage_api

router = APIRouter(route_class=ParsedBodyRoute)  # large bodies parsed off the loop


@dataclass(slots=True)
class Prompt:
    text: str
    token_ids: list[int]


class LogprobsBuilder:
    """OpenAI's legacy logprobs for one choice; text_offset counts characters from the start of the
    choice's text (echoed prompt included), in the stream as in the full response."""

    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self.offset = 0
        self.total = CompletionLogprobs()

    def add_prompt(self, tokens: list[str]) -> CompletionLogprobs:
        """Echoed prompt tokens: their logprobs are not computed, so they are null."""
        return self._append(tokens, [None] * len(tokens), [None] * len(tokens))

    def add(self, entries: list[TokenLogprob]) -> CompletionLogprobs:
        tops: list[dict[str, float] | None] = [
            {e.token: e.logprob, **{t.token: t.logprob for t in e.top[: self.top_n]}} for e in entries
        ]
        return self._append([e.token for e in entries], [e.logprob for e in entries], tops)

    def _append(self, tokens: list[str], logprobs: list, tops: list) -> CompletionLogprobs:
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        part = CompletionLogprobs(
            text_offset=offsets, token_logprobs=logprobs, tokens=tokens, top_logprobs=tops
        )
        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
            getattr(self.total, name).extend(getattr(part, name))
        return part


@dataclass(slots=True)
class CompletionContext:
    request_id: str
    created: int
    model: str
    prompts: list[Prompt]
    n: int
    echo: bool
    logprobs: int | None
    include_usage: bool
    token_strings: list[list[str]]  # per prompt, for echoed logprobs


@router.post("/v1/completions", response_model=None, dependencies=[usage_api("completions")])
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    engine = ready_engine(state, allow_unhealthy=state.overflow is not None)
    model = check_model(state, body.model)
    check_common_fields(body)
    if body.suffix:
        raise bad_request("'suffix' is not supported.", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("'best_of' is not supported (other than equal to 'n').", param="best_of")
    raw_prompts = _prompt_list(body.prompt)
    check_batch_size(state, prompts=len(raw_prompts), n=body.n)
    prompts = await run_in_pool(state, _prompts, raw_prompts, engine.tokenizer)
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    check_prompt_tokens(state, prompt_tokens, "prompt")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    arrival, client = time.monotonic(), client_of(request, request_id)
    requests = []
    for i, prompt in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            body.max_tokens,
            len(prompt.token_ids),
            engine.max_model_len,
            "prompt",
            state.sampling_defaults.max_tokens,
        )
        params = to_sampling_params(
            body, max_tokens=max_tokens, logprobs=body.logprobs, defaults=state.sampling_defaults
        )
        engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        requests.append(
            GenerateRequest(
                engine_id, prompt.token_ids, params, n=body.n, arrival_time=arrival, client=client
            )
        )
    sequences = len(prompts) * body.n
    decision = admit(state, engine, request, sequences=sequences, tokens=prompt_tokens * body.n)
    overflowed = await serve_overflow(
        state, engine, request, decision, path="completions", prompt_tokens=prompt_tokens,
        sequences=sequences, tokens=prompt_tokens * body.n,
    )  # fmt: skip
    if overflowed is not None:
        return overflowed

    record = request_record(request.scope)
    record.served_locally(request_id, model, body.stream, [p.text for p in prompts])
    token_strings = await run_in_pool(state, _token_strings, prompts, engine.tokenizer) if body.echo else []
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    context = CompletionContext(
        request_id,
        int(time.time()),
        model,
        prompts,
        body.n,
        body.echo,
        body.logprobs,
        include_usage,
        token_strings,
    )
    generation = Generation(engine, state.metrics, requests, record, state.generations)
    return await respond(
        request, generation, request_id, stream=body.stream,
        stream_body=lambda: _stream_chunks(context, generation), complete=lambda: _complete(context, generation),
    )  # fmt: skip


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
    """The request's prompts as a list (one prompt of token ids is a list of ints)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("The prompt is empty.", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


def _prompts(prompts: list[str] | list[list[int]], tokenizer: Any) -> list[Prompt]:
    """Each prompt's text and token ids (CPU-heavy: run it in the front-end pool)."""
    vocab_size = len(tokenizer)
    out = []
    for item in prompts:
        if isinstance(item, str):
            out.append(Prompt(item, encode_prompt(tokenizer, item, add_special_tokens=True)))
            continue
        if any(not 0 <= t < vocab_size for t in item):
            raise bad_request(f"Prompt token ids must be in [0, {vocab_size}).", param="prompt")
        out.append(Prompt(tokenizer.decode(item), list(item)))
    return out


def _token_strings(prompts: list[Prompt], tokenizer: Any) -> list[list[str]]:
    return [[tokenizer.decode([t]) for t in p.token_ids] for p in prompts]


def _new_builders(context: CompletionContext) -> list[LogprobsBuilder | None]:
    if context.logprobs is None:
        return [None] * (len(context.prompts) * context.n)
    return [LogprobsBuilder(context.logprobs) for _ in range(len(context.prompts) * context.n)]


async def _complete(context: CompletionContext, generation: Generation) -> Response:
    count = len(context.prompts) * context.n
    texts: list[list[str]] = [[] for _ in range(count)]
    builders = _new_builders(context)
    for i in range(count):
        if context.echo:
            texts[i].append(context.prompts[i // context.n].text)
            if builders[i] is not None:
                builders[i].add_prompt(context.token_strings[i // context.n])
    async for delta in generation:
        texts[delta.index].append(delta.text)
        builder = builders[delta.index]
        if builder is not None and delta.logprobs:
            builder.add(delta.logprobs)
    choices = [
        CompletionChoice(
            index=i,
            text="".join(texts[i]),
            logprobs=builders[i].total if builders[i] is not None else None,
            finish_reason=generation.choices[i].finish_reason,
            stop_reason=generation.choices[i].stop_reason,
        )
        for i in range(count)
    ]
    response = CompletionResponse(
        id=context.request_id, created=context.created, model=context.model, choices=choices,
        usage=generation.usage(),
    )  # fmt: skip
    return completion_response(response, context.request_id)


async def _stream_chunks(context: CompletionContext, generation: Generation) -> AsyncIterator[bytes]:
    builders = _new_builders(context)
    encoder = ChunkEncoder(context.request_id, "text_completion", context.created, context.model)
    try:
        if context.echo:
            for i, builder in enumerate(builders):
                prompt_index = i // context.n
                logprobs = (
                    builder.add_prompt(context.token_strings[prompt_index]) if builder is not None else None
                )
                yield encoder.choice(_choice(i, context.prompts[prompt_index].text, logprobs))
        async for delta in generation:
            builder = builders[delta.index]
            logprobs = builder.add(delta.logprobs) if builder is not None and delta.logprobs else None
            if not delta.text and not delta.finished and logprobs is None:
                continue
            yield encoder.choice(
                _choice(delta.index, delta.text, logprobs, delta.finish_reason, delta.stop_reason)
            )
        if context.include_usage:
            yield encoder.usage(generation.usage())
    except Exception as exc:
        yield error_event(exc, context.request_id)
    yield SSE_DONE


def _choice(
    index: int,
    text: str,
    logprobs: CompletionLogprobs | None,
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs.model_dump() if logprobs is not None else None,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
    }
