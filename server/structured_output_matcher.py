"""The native engine's side of structured outputs: one llguidance matcher per constrained request, and the
batched token bitmask the sampler applies before sampling.

The mask is llguidance's packed bitmask (one bit per token), filled on the host and moved to the logits'
device once per step, where the sampler unpacks and applies it to the whole batch.

A matcher always reflects the request's accepted output tokens: before each mask it consumes the tokens
accepted since the last one. Preemption by recompute drops it (the engine calls drop()), and the next
mask rebuilds it from the accepted tokens; finish and abort release it. Compiled grammars are cached per
grammar key for this engine's tokenizer (one GrammarMatchers per tokenizer): a new request deep-copies a
pristine matcher instead of compiling again.

A constraint with `starts_after` (GLM's `</think>`) leaves the output free until those tokens have been
generated; the matcher consumes only what follows them."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from server.scheduler.request import Request
from server.structured_output import StructuredOutput, llguidance_grammar

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _State:
    matcher: Any  # llguidance.LLMatcher
    consumed: int = 0  # output tokens looked at
    started: bool = True  # the constrained part has begun (False: still before starts_after)


class GrammarMatchers:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int], cache_size: int = 256):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._cache_size = cache_size
        self._ll_tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # grammar key -> pristine matcher
        self._start_ids: dict[str, list[int]] = {}
        self._states: dict[str, _State] = {}
        self.num_compiled = 0  # grammars compiled (cache misses), for tests and benchmarks
        self.num_rebuilt = 0  # matchers rebuilt from accepted tokens (after preemption)
        self.mask_seconds = 0.0  # time spent advancing matchers and filling masks (benchmarks)
        self.mask_steps = 0  # steps that built a mask

    def _ll(self) -> Any:
        if self._ll_tokenizer is None:  # ~0.5 s for a 50k vocabulary: built on the first constraint
            import llguidance.hf

            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids or None
            )
        return self._ll_tokenizer

    def compile(self, constraint: StructuredOutput) -> str | None:
        """Compile (or find cached) the grammar of a constraint; the error when it cannot be used."""
        import llguidance

        key = constraint.key
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return None
        matcher = llguidance.LLMatcher(self._ll(), llguidance_grammar(constraint), log_level=0)
        if matcher.is_error():
            return matcher.get_error()
        self.num_compiled += 1
        self._compiled[key] = matcher
        while len(self._compiled) > self._cache_size:
            self._compiled.popitem(last=False)
        return None

    def drop(self, request_id: str) -> None:
        """Forget a request's matcher (preempted, finished or aborted)."""
        self._states.pop(request_id, None)

    def fill_bitmask(self, reqs: list[Request]) -> torch.Tensor | None:
        """Allowed tokens per row as llguidance's packed int32 bitmask [len(reqs), ceil(vocab / 32)] on the
        host; None when no row is constrained yet. Unconstrained rows allow every token."""
        import llguidance.torch

        started = time.perf_counter()
        rows = [(i, self._state(r)) for i, r in enumerate(reqs) if r.params.structured is not None]
        rows = [(i, s) for i, s in rows if s is not None and s.started]
        if not rows:
            return None
        bitmask = torch.full((len(reqs), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for i, state in rows:
            llguidance.torch.fill_next_token_bitmask(state.matcher, bitmask, i)
        self.mask_seconds += time.perf_counter() - started
        self.mask_steps += 1
        return bitmask

    def fill_mask(self, reqs: list[Request]) -> torch.Tensor | None:
        """fill_bitmask unpacked: a [len(reqs), vocab] bool tensor; None when no row is constrained yet."""
        bitmask = self.fill_bitmask(reqs)
        return None if bitmask is None else unpack_bitmask(bitmask, self.vocab_size)

    def _state(self, req: Request) -> _State | None:
        constraint: StructuredOutput = req.params.structured
        state = self._states.get(req.request_id)
        tokens = req.output_token_ids
        if state is None or state.consumed > len(tokens):
            state = self._new_state(req.request_id, constraint, rebuild=bool(tokens))
            if state is None:
                return None
        for position in range(state.consumed, len(tokens)):
            token = tokens[position]
            if not state.started:
                state.started = self._ends_with_start(tokens, position + 1, constraint.starts_after)
            elif token not in self._eos_token_ids and not state.matcher.consume_token(token):
                log.warning("request %s left its grammar: %s", req.request_id, state.matcher.get_error())
        state.consumed = len(tokens)
        return state if not state.matcher.is_error() else None

    def _new_state(self, request_id: str, constraint: StructuredOutput, rebuild: bool) -> _State | None:
        if constraint.key not in self._compiled and self.compile(constraint) is not None:
            return None
        self._compiled.move_to_end(constraint.key)
        self.num_rebuilt += rebuild
        state = _State(self._compiled[constraint.key].deep_copy(), started=constraint.starts_after is None)
        self._states[request_id] = state
        return state

    def _ends_with_start(self, tokens: list[int], end: int, starts_after: str | None) -> bool:
        ids = self._start_ids.get(starts_after or "")
        if ids is None:
            ids = self._start_ids[starts_after or ""] = list(
                self._tokenizer.encode(starts_after or "", add_special_tokens=False)
            )
        return end >= len(ids) and tokens[end - len(ids) : end] == ids


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's / xgrammar's int32 bitmask (bit j of word w allows token 32 * w + j) as a bool tensor,
    on the bitmask's device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
