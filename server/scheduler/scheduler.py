"""Continuous-batching scheduler of the native engine. Plain Python, no device.

There are no prefill and decode phases: each request's num_computed_tokens catches up with its
num_tokens (prompt + output). A prompt is computed in chunks under the per-step token budget, a decode
step is a chunk of one token, and a request preempted by recompute starts again from zero with its
generated tokens kept.

Speculative decoding (vLLM v1's model): a decoding request may carry draft tokens (request.spec_token_ids).
They are scheduled with its decode token, KV slots are allocated for them, and the runner returns the
accepted drafts plus one token of its own; num_computed_tokens then advances by accepted + 1, so the slots
of rejected drafts are simply computed again (overwritten) by the next step.

Prefill fairness (vLLM's long_prefill_token_threshold / max_long_partial_prefills): while other requests
wait, no request computes more than long_prefill_token_threshold tokens in one step, so a long prompt
leaves budget for the short requests behind it (alone, it takes the whole budget); and at most max_long_partial_prefills prompts longer than the
threshold are part-way through their prefill at once, while shorter waiting requests may pass them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from server.scheduler.kv_cache import KVCacheManager
from server.scheduler.request import Request, RequestStatus
from server.scheduler.spec_decode_stats import SpecDecodingStats
from server.scheduler.waiting import WaitingQueue

ADMISSION_SCAN = 64  # waiting requests looked at per step past long prompts that must wait their turn


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: compute positions [start, start + num_new_tokens)."""

    request: Request
    start: int  # request.num_computed_tokens at schedule time
    num_new_tokens: int
    block_ids: list[int]  # the request's whole block table after allocation (read-only)
    sample: bool  # the chunk reaches request.num_tokens: the runner samples (verifies) for it
    draft_token_ids: list[int] = field(default_factory=list)  # computed after the request's tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted: list[Request]  # preempted in this schedule() call
    finished: list[Request]  # finished inside schedule() (e.g. FINISHED_ERROR: can never fit)


class Scheduler:
    """Decides, step by step, which requests compute how many tokens in which KV blocks.

    The engine loop is: out = schedule(); sampled = runner.execute(out); update_from_output(out, sampled).
    The oldest running request always progresses: when blocks run out, the newest running request is
    preempted, and a request whose full length can never fit the KV cache is refused with FINISHED_ERROR.
    """

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        long_prefill_token_threshold: int | None = None,
        max_long_partial_prefills: int = 1,
    ) -> None:
        """long_prefill_token_threshold: None means max_num_batched_tokens // 4, 0 turns the cap off."""
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0 or max_model_len <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")
        if max_long_partial_prefills < 1:
            raise ValueError("max_long_partial_prefills must be >= 1")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        if long_prefill_token_threshold is None:
            long_prefill_token_threshold = max(1, max_num_batched_tokens // 4)
        self.long_prefill_token_threshold = long_prefill_token_threshold or max_num_batched_tokens
        self.max_long_partial_prefills = max_long_partial_prefills
        self.waiting = WaitingQueue()  # FCFS; preempted requests go back to the front
        self.running: list[Request] = []  # oldest first
        self.num_preemptions_total = 0
        self.prefix_cache_queries_total = 0  # prompt tokens looked up in the prefix cache (first schedule)
        self.prefix_cache_hits_total = 0  # of those, tokens found cached
        self._requests: dict[str, Request] = {}  # every unfinished request, by id
        self._refused: list[Request] = []  # finished in add(), reported by the next schedule()
        self.spec_stats = SpecDecodingStats()

    # -- state ---------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_waiting_tokens(self) -> int:
        """Tokens the waiting requests have to compute (prompts, and outputs kept by preempted ones)."""
        return self.waiting.num_tokens

    def has_unfinished(self) -> bool:
        """True while some request is waiting, running, or finished but not yet reported."""
        return bool(self._requests) or bool(self._refused)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    # -- admission -----------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request. One that can never be served is finished with FINISHED_ERROR at once and
        reported in the next schedule()'s output.finished."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        error = self._refusal(request)
        if error is not None:
            request.status = RequestStatus.FINISHED_ERROR
            request.error = error
            self._refused.append(request)
            return
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def _refusal(self, request: Request) -> str | None:
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            return "the prompt is empty"
        if num_prompt >= self.max_model_len:
            return (
                f"the prompt has {num_prompt} tokens, but the model's context length is "
                f"{self.max_model_len}: no room to generate"
            )
        if request.params.max_tokens < 1:
            return f"max_tokens must be at least 1, got {request.params.max_tokens}"
        max_len = min(num_prompt + request.params.max_tokens, self.max_model_len)
        block_size = self.kv.block_size
        num_blocks_needed = -(-max_len // block_size)
        if num_blocks_needed > self.kv.num_blocks:
            return (
                f"the request may need {max_len} tokens of KV cache ({num_blocks_needed} blocks of "
                f"{block_size}), but the KV cache holds only {self.kv.num_blocks * block_size} tokens; "
                "shorten the prompt or lower max_tokens"
            )
        return None

    # -- scheduling ----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first (oldest first), then waiting ones (FCFS).

        The sum of num_new_tokens never exceeds max_num_batched_tokens, and at most max_num_seqs
        requests run. When a running request cannot get blocks, the newest running request is preempted
        (possibly itself). Waiting requests are not admitted in a step that preempted, and admission
        stops at the first waiting request that does not fit (no overtaking, no starvation).
        """
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        finished, self._refused = self._refused, []
        chunk_cap = self.long_prefill_token_threshold if self.waiting else budget

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget, chunk_cap)
            if num_new <= 0:  # nothing to compute (the previous step's output was never applied)
                index += 1
                continue
            drafts = self._drafts_that_fit(request, budget)
            block_ids = self.kv.allocate_slots(request, num_new + len(drafts)) if drafts else None
            if block_ids is not None:
                scheduled.append(self._scheduled(request, num_new + len(drafts), block_ids, drafts))
                budget -= num_new + len(drafts)
                index += 1
                continue
            block_ids = self.kv.allocate_slots(request, num_new)  # no drafts when blocks run short
            while block_ids is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
                block_ids = self.kv.allocate_slots(request, num_new)
            if block_ids is None:
                break  # preempted itself: it was the last running request
            scheduled.append(self._scheduled(request, num_new, block_ids))
            budget -= num_new
            index += 1

        if not preempted:
            budget = self._admit_waiting(budget, scheduled, long_limit=True)
        budget = self._extend_capped_prefills(budget, scheduled)
        if (
            not preempted and budget > 0
        ):  # nothing else wants the budget: long prompts past the limit may start
            budget = self._admit_waiting(budget, scheduled, long_limit=False)
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted=preempted,
            finished=finished,
        )

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest], long_limit: bool) -> int:
        """Admit waiting requests in order while budget, sequence slots and KV blocks last. With
        long_limit, a prompt over the threshold waits (and shorter ones pass it) while
        max_long_partial_prefills long prompts are mid-prefill. A request that does not fit the KV cache
        stops admission (no overtaking there)."""
        kv = self.kv
        long_partial = sum(1 for r in self.running if self._is_long_prefill(r))
        for request in list(itertools.islice(self.waiting, max(ADMISSION_SCAN, self.max_num_seqs))):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            computed_blocks, num_computed = kv.get_computed_blocks(request)
            remaining = request.num_tokens - num_computed
            is_long = remaining > self.long_prefill_token_threshold
            if long_limit and is_long and long_partial >= self.max_long_partial_prefills:
                continue  # its turn comes when a long prefill in progress is done
            request.num_computed_tokens = num_computed
            chunk_cap = self.long_prefill_token_threshold if len(self.waiting) > 1 else budget  # others wait
            num_new = min(remaining, budget, chunk_cap)
            block_ids = kv.allocate_slots(request, num_new, computed_blocks)
            if block_ids is None:
                request.num_computed_tokens = 0
                break
            self.waiting.remove(request)
            if request.num_preemptions == 0:  # first schedule: what the prefix cache saved
                request.num_cached_tokens = num_computed
                if kv.enable_prefix_caching:
                    self.prefix_cache_queries_total += request.num_tokens
                    self.prefix_cache_hits_total += num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new, block_ids))
            budget -= num_new
            long_partial += is_long and num_new < remaining
        return budget

    def _extend_capped_prefills(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        """Budget nobody else took goes to the prefill chunks the threshold cut short, oldest first."""
        for item in scheduled:
            if budget <= 0:
                break
            request = item.request
            missing = request.num_tokens - (item.start + item.num_new_tokens)
            if missing <= 0:
                continue
            extra = min(missing, budget)
            block_ids = self.kv.allocate_slots(request, item.num_new_tokens + extra)
            if block_ids is None:
                continue
            item.num_new_tokens += extra
            item.block_ids = block_ids
            item.sample = item.start + item.num_new_tokens == request.num_tokens
            budget -= extra
        return budget

    def _is_long_prefill(self, request: Request) -> bool:
        """A prompt (or recompute) over the threshold, part-way through: more than the threshold to go."""
        return request.num_tokens - request.num_computed_tokens > self.long_prefill_token_threshold

    def _drafts_that_fit(self, request: Request, budget: int) -> list[int]:
        """The request's draft tokens this step may verify: it must be decoding (one token to compute),
        and the drafts fit the token budget, max_tokens and the context length (counting the token the
        runner adds after them). They are taken from the request either way: a draft is used once."""
        drafts, request.spec_token_ids = request.spec_token_ids, []
        if not drafts or request.num_tokens - request.num_computed_tokens != 1:
            return []
        room = min(
            budget - 1,
            request.params.max_tokens - request.num_output_tokens - 1,
            self.max_model_len - request.num_tokens - 1,
        )
        return drafts[: max(room, 0)]

    @staticmethod
    def _scheduled(
        request: Request, num_new: int, block_ids: list[int], drafts: list[int] | None = None
    ) -> ScheduledRequest:
        start = request.num_computed_tokens
        drafts = drafts or []
        return ScheduledRequest(
            request=request,
            start=start,
            num_new_tokens=num_new,
            block_ids=block_ids,
            sample=start + num_new - len(drafts) == request.num_tokens,
            draft_token_ids=drafts,
        )

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop its KV blocks, keep its tokens, queue it first."""
        self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    # -- results -------------------------------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Apply one executed step: advance computed tokens, append the tokens each sampling request got
        (its accepted draft tokens, then the runner's own), cache full blocks, and finish those that hit
        a stop condition (tokens after the stop are dropped). Requests finished since schedule()
        (finish()/abort()) are skipped. Returns the requests that finished here."""
        finished: list[Request] = []
        block_size = self.kv.block_size
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue
            assert request.num_computed_tokens == item.start, f"{request.request_id}: stale output"
            tokens = sampled[request.request_id] if item.sample else []
            num_drafts = len(item.draft_token_ids)
            if num_drafts:
                assert 1 <= len(tokens) <= num_drafts + 1, f"{request.request_id}: {len(tokens)} tokens"
                self.spec_stats.observe(num_drafts, len(tokens) - 1)
            num_rejected = num_drafts + 1 - len(tokens) if num_drafts else 0
            stopped = self._append_output(request, tokens)
            # A stop among the accepted drafts drops the tokens after it, and their positions with them.
            end = item.start + item.num_new_tokens - num_rejected
            request.num_computed_tokens = min(end, request.num_tokens - 1) if stopped else end
            if request.num_computed_tokens // block_size > item.start // block_size:
                self.kv.cache_full_blocks(request)  # some block just became full
            if stopped:
                self._requests.pop(request.request_id, None)
                self.kv.free(request)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return finished

    def _append_output(self, request: Request, tokens: list[int]) -> bool:
        """Append tokens up to the first that ends the request; True if one did."""
        for token_id in tokens:
            request.output_token_ids.append(token_id)
            if self._check_stop(request, token_id):
                return True
        return False

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Set the finished status if the just-sampled token ends the request; True if it does."""
        params = request.params
        num_output = request.num_output_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = None
                return True
            if token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
        if num_output >= params.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def finish(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish an unfinished request from outside (stop string found, client gone): its blocks are
        freed at once and it leaves the queues. Returns None if the id is unknown or already finished."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)  # at most max_num_seqs long
        else:
            self.waiting.remove(request)  # O(1)
        request.status = status
        if stop_reason is not None:
            request.stop_reason = stop_reason
        self.kv.free(request)
        return request

    def abort(self, request_ids: str | Iterable[str]) -> list[Request]:
        """finish(id, FINISHED_ABORTED) for each id; returns the requests that were actually aborted."""
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        aborted = (self.finish(rid, RequestStatus.FINISHED_ABORTED) for rid in request_ids)
        return [request for request in aborted if request is not None]
