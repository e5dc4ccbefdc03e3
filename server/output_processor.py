"""The front end's half of the native engine: turns the core's token ids into Deltas, on the event loop.

Per choice: incremental detokenization, stop strings (a stop string ends the choice: the tokens after it
are dropped and the core is told to abort the request, as vLLM does), the text of logprob tokens, and the
Delta itself. Per GenerateRequest: the n choices, of which all but the first wait until the first has its
prompt computed, so that they find its blocks in the prefix cache instead of computing them again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.detokenizer import IncrementalDetokenizer
from server.engine_api import Delta, EngineError, GenerateRequest, TokenLogprob, TopLogprob
from server.engine_core_messages import AbortRequests, AddRequest, CoreInput, RequestOutput, params_to_wire


@dataclass(slots=True)
class _Choice:
    request_id: str  # the core's id: the request's own with n == 1, else "<id>-<index>"
    group: _Group
    index: int
    detok: IncrementalDetokenizer
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    scheduled_time: float | None = None


@dataclass(slots=True)
class _Group:
    request: GenerateRequest
    sink: asyncio.Queue
    live: int  # choices not finished yet
    choices: list[_Choice] = field(default_factory=list)
    pending: list[_Choice] = field(default_factory=list)  # waiting for the first choice's prompt


@dataclass(slots=True)
class StepCounts:
    """What one batch of outputs added, for the front end's counters and throughput rate."""

    num_tokens: int = 0
    num_finished: int = 0


class OutputProcessor:
    def __init__(self, tokenizer, send: Callable[[CoreInput], None], prefix_caching: bool):
        self.tokenizer = tokenizer  # this processor's own copy: the front-end pool encodes with another
        self._send = send
        self._prefix_caching = prefix_caching
        self._choices: dict[str, _Choice] = {}
        self._groups: dict[str, _Group] = {}
        self.num_sent = [0, 0]  # sequences and prompt tokens sent to the core so far
        self.num_parked = [0, 0]  # the same for choices waiting on their first choice

    def has_unfinished(self) -> bool:
        return bool(self._choices)

    def add(self, request: GenerateRequest, sink: asyncio.Queue) -> None:
        group = _Group(request, sink, live=request.n)
        p = request.params
        for i in range(request.n):
            rid = request.request_id if request.n == 1 else f"{request.request_id}-{i}"
            detok = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, p.stop, p.skip_special_tokens,
                p.include_stop_str_in_output,
            )  # fmt: skip
            choice = _Choice(rid, group, i, detok)
            self._choices[rid] = choice
            group.choices.append(choice)
            if i == 0 or not self._prefix_caching:
                self._send_add(choice)
            else:
                group.pending.append(choice)
                self._park(request, +1)
        self._groups[request.request_id] = group

    def _send_add(self, choice: _Choice) -> None:
        request = choice.group.request
        self.num_sent[0] += 1
        self.num_sent[1] += len(request.prompt_token_ids)
        self._send(
            AddRequest(
                choice.request_id, list(request.prompt_token_ids), params_to_wire(request.params),
                request.arrival_time or time.monotonic(), request.client or request.request_id,
            )
        )  # fmt: skip

    def _park(self, request: GenerateRequest, sign: int) -> None:
        self.num_parked[0] += sign
        self.num_parked[1] += sign * len(request.prompt_token_ids)

    def abort(self, request_id: str) -> None:
        """Abort every choice of a request; a consumer still listening gets a final "abort" delta. An id
        already finished or aborted is ignored."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        self._unpark(group)
        aborted = [c for c in group.choices if self._choices.pop(c.request_id, None) is not None]
        if aborted:
            self._send(AbortRequests([c.request_id for c in aborted]))
        for choice in aborted:
            group.sink.put_nowait(self._final(choice, "abort"))

    def fail_all(self, error: BaseException) -> None:
        """The core is gone: every consumer gets the error."""
        for group in self._groups.values():
            group.sink.put_nowait(error)
        self._forget_all()

    def finish_all(self, error: str) -> None:
        """Shutdown: every choice still running ends with a final "abort" delta."""
        for choice in self._choices.values():
            choice.group.sink.put_nowait(self._final(choice, "abort", error=error))
        self._forget_all()

    def _forget_all(self) -> None:
        self._choices.clear()
        self._groups.clear()
        self.num_parked = [0, 0]

    # --- the core's outputs -----------------------------------------------------------------------------
    def process(self, outputs: list[RequestOutput]) -> StepCounts:
        """Deliver one step's outputs to their consumers."""
        counts = StepCounts()
        now = time.monotonic()
        stopped: list[str] = []
        for out in outputs:
            choice = self._choices.get(out.request_id)
            if choice is None:
                continue  # aborted or stopped here after the core sent it
            group = choice.group
            if out.finish_reason == "refused":
                self._refuse(group, out.error or "refused")
                continue
            if out.finish_reason == "error" and not out.new_token_ids:
                delta = self._final(choice, "error", error=out.error)
            else:
                delta = self._token_delta(choice, out, now)
                counts.num_tokens += len(delta.token_ids)
                if delta.finish_reason == "stop" and out.finish_reason is None:
                    stopped.append(choice.request_id)  # a stop string: the core still runs it
            group.sink.put_nowait(delta)
            if delta.finished:
                counts.num_finished += 1
                self._retire(choice)
            elif choice.index == 0:
                self._release_pending(group)
        if stopped:
            self._send(AbortRequests(stopped))
        return counts

    def _token_delta(self, choice: _Choice, out: RequestOutput, now: float) -> Delta:
        """The delta of one step's tokens (several with speculative decoding). A stop string ends the
        choice at the token that completes it; the tokens after it are dropped."""
        if choice.first_token_time is None:
            choice.first_token_time = now
        if choice.scheduled_time is None:
            choice.scheduled_time = out.scheduled_time
        choice.num_cached_tokens = out.num_cached_tokens
        token_ids = out.new_token_ids
        finished = out.finish_reason is not None
        text, stop = "", None
        for i, token_id in enumerate(token_ids):
            step = choice.detok.add(token_id, final=finished and i == len(token_ids) - 1)
            text += step.text
            if step.stop is not None:
                stop = step.stop
                token_ids = token_ids[: i + 1]
                break
        choice.num_output_tokens += len(token_ids)
        finish_reason, stop_reason = None, None
        if stop is not None:
            finish_reason, stop_reason = "stop", stop
        elif finished:
            finish_reason, stop_reason = out.finish_reason, out.stop_reason
            text += choice.detok.flush()
        logprobs = None
        if out.logprobs is not None:
            logprobs = [self._logprob(t, lp) for t, lp in zip(token_ids, out.logprobs, strict=False)]
        return Delta(
            index=choice.index,
            text=text,
            token_ids=list(token_ids),
            num_prompt_tokens=len(choice.group.request.prompt_token_ids),
            num_output_tokens=choice.num_output_tokens,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_cached_tokens=choice.num_cached_tokens,
            first_token_time=choice.first_token_time,
            scheduled_time=choice.scheduled_time,
        )

    def _logprob(self, token_id: int, logprob: tuple[float, list[int], list[float]]) -> TokenLogprob:
        value, top_ids, top_logprobs = logprob
        top = [TopLogprob(t, self._token_text(t), lp) for t, lp in zip(top_ids, top_logprobs, strict=True)]
        return TokenLogprob(token_id, self._token_text(token_id), value, top)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _final(self, choice: _Choice, reason: str, error: str | None = None) -> Delta:
        return Delta(
            index=choice.index,
            text=choice.detok.flush(),
            token_ids=[],
            num_prompt_tokens=len(choice.group.request.prompt_token_ids),
            num_output_tokens=choice.num_output_tokens,
            finish_reason=reason,
            error=error,
            first_token_time=choice.first_token_time,
        )

    def _refuse(self, group: _Group, error: str) -> None:
        """The core cannot serve the request at all: its consumer raises EngineError."""
        self._groups.pop(group.request.request_id, None)
        self._unpark(group)
        others = [c.request_id for c in group.choices if self._choices.pop(c.request_id, None) is not None]
        if others:
            self._send(AbortRequests(others))
        group.sink.put_nowait(EngineError(error))

    def _retire(self, choice: _Choice) -> None:
        self._choices.pop(choice.request_id, None)
        group = choice.group
        self._release_pending(group)
        group.live -= 1
        if group.live == 0:
            self._groups.pop(group.request.request_id, None)

    def _release_pending(self, group: _Group) -> None:
        """The first choice has its prompt in the cache (or is gone): send the other choices."""
        pending = [c for c in group.pending if c.request_id in self._choices]
        self._unpark(group)
        for choice in pending:
            self._send_add(choice)

    def _unpark(self, group: _Group) -> None:
        for _ in group.pending:
            self._park(group.request, -1)
        group.pending.clear()
