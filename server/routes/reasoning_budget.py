"""A cap on reasoning tokens (Anthropic's thinking.budget_tokens) for prompts that open GLM's <think>.

ReasoningBudget wraps the engine for one request. The engine generates at most `budget` tokens first. If
that limit ended it with the reasoning still open (no </think> yet), </think> is appended as if generated
and generation continues from the prompt plus everything so far (the prefix cache makes that prefill
cheap) with what is left of max_tokens: the answer starts. If the reasoning closed within the budget but
the answer reached the limit, generation continues the same way without the tag. The caller sees one
stream of deltas with cumulative token counts, as from one request; the continuation keeps the request
id, so aborting the request aborts whichever part runs."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from server.engine_api import Delta, Engine, GenerateRequest
from server.parsers.tags import THINK_CLOSE


class ReasoningBudget:
    """The engine with a reasoning budget on its generate(); everything else is the engine's."""

    def __init__(self, engine: Engine, budget: int) -> None:
        self._engine = engine
        self.budget = budget
        self.close_ids = list(engine.tokenizer.encode(THINK_CLOSE, add_special_tokens=False))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        total = request.params.max_tokens
        if self.budget >= total:
            async with aclosing(self._engine.generate(request)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        first = _with_params(
            request, max_tokens=self.budget, min_tokens=min(request.params.min_tokens, self.budget)
        )
        generated: list[int] = []
        tail = ""  # enough of the text to see a </think> split across deltas
        reasoning_open = True
        cut: Delta | None = None
        async with aclosing(self._engine.generate(first)) as deltas:
            async for delta in deltas:
                generated += delta.token_ids
                tail = (tail + delta.text)[-(len(THINK_CLOSE) + len(delta.text)) :]
                reasoning_open = reasoning_open and THINK_CLOSE not in tail
                if delta.finish_reason == "length":
                    cut = delta
                    break
                yield delta
        if cut is None:
            return
        async for delta in self._continue(request, cut, generated, reasoning_open):
            yield delta

    async def _continue(
        self, request: GenerateRequest, cut: Delta, generated: list[int], reasoning_open: bool
    ) -> AsyncIterator[Delta]:
        closing = self.close_ids if reasoning_open else []
        produced = cut.num_output_tokens + len(closing)
        yield dataclasses.replace(
            cut, text=cut.text + (THINK_CLOSE if closing else ""), token_ids=[*cut.token_ids, *closing],
            num_output_tokens=produced, finish_reason=None, stop_reason=None,
        )  # fmt: skip
        left = request.params.max_tokens - produced
        if left <= 0:
            yield dataclasses.replace(
                cut, text="", token_ids=[], num_output_tokens=produced, finish_reason="length"
            )
            return
        rest = _with_params(request, max_tokens=left, min_tokens=max(0, request.params.min_tokens - produced))
        rest.prompt_token_ids = [*request.prompt_token_ids, *generated, *closing]
        async with aclosing(self._engine.generate(rest)) as deltas:
            async for delta in deltas:
                yield dataclasses.replace(
                    delta, num_prompt_tokens=cut.num_prompt_tokens, num_cached_tokens=cut.num_cached_tokens,
                    num_output_tokens=produced + delta.num_output_tokens,
                    first_token_time=cut.first_token_time, scheduled_time=cut.scheduled_time,
                )  # fmt: skip


def _with_params(request: GenerateRequest, **changes: Any) -> GenerateRequest:
    return dataclasses.replace(request, params=dataclasses.replace(request.params, **changes))
