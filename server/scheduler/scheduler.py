"""Continuous-batching scheduler of the native engine. Plain Python, no device.

There are no prefill and decode phases: each request's num_computed_tokens catches up with its
num_tokens (prompt + output). A prompt is computed in chunks under the per-step token budget, a decode
step is a chunk of one token, and a request preempted by recompute starts again from zero with its
generated tokens kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from server.scheduler.kv_cache import KVCacheManager
from server.scheduler.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: compute positions [start, start + num_new_tokens)."""

    request: Request
    start: int  # request.num_computed_tokens at schedule time
    num_new_tokens: int
    block_ids: list[int]  # the request's whole block table after allocation (read-only)
    sample: bool  # the chunk reaches request.num_tokens: the runner samples one token for it


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
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int
    ) -> None:
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0 or max_model_len <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()  # FCFS; preempted requests go back to the front
        self.running: list[Request] = []  # oldest first
        self.num_preemptions_total = 0
        self.prefix_cache_queries_total = 0  # prompt tokens looked up in the prefix cache (first schedule)
        self.prefix_cache_hits_total = 0  # of those, tokens found cached
        self._requests: dict[str, Request] = {}  # every unfinished request, by id
        self._refused: list[Request] = []  # finished in add(), reported by the next schedule()

    # -- state ---------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

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

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute (the previous step's output was never applied)
                index += 1
                continue
            block_ids = self.kv.allocate_slots(request, num_new)
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
            budget = self._admit_waiting(budget, scheduled)
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.max_num_batched_tokens - budget,
            preempted=preempted,
            finished=finished,
        )

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        kv = self.kv
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_computed = kv.get_computed_blocks(request)
            request.num_computed_tokens = num_computed
            num_new = min(request.num_tokens - num_computed, budget)
            block_ids = kv.allocate_slots(request, num_new, computed_blocks)
            if block_ids is None:
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if request.num_preemptions == 0:  # first schedule: what the prefix cache saved
                request.num_cached_tokens = num_computed
                if kv.enable_prefix_caching:
                    self.prefix_cache_queries_total += request.num_tokens
                    self.prefix_cache_hits_total += num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._scheduled(request, num_new, block_ids))
            budget -= num_new
        return budget

    @staticmethod
    def _scheduled(request: Request, num_new: int, block_ids: list[int]) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request=request,
            start=start,
            num_new_tokens=num_new,
            block_ids=block_ids,
            sample=start + num_new == request.num_tokens,
        )

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop its KV blocks, keep its tokens, queue it first."""
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    # -- results -------------------------------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Apply one executed step: advance computed tokens, cache full blocks, append the sampled token
        of each request that sampled, and finish those that hit a stop condition. Requests finished
        since schedule() (finish()/abort()) are skipped. Returns the requests that finished here."""
        finished: list[Request] = []
        block_size = self.kv.block_size
        for item in output.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue
            assert request.num_computed_tokens == item.start, f"{request.request_id}: stale output"
            end = item.start + item.num_new_tokens
            request.num_computed_tokens = end
            if end // block_size > item.start // block_size:  # some block just became full
                self.kv.cache_full_blocks(request)
            if not item.sample:
                continue
            token_id = sampled[request.request_id]
            request.output_token_ids.append(token_id)
            if self._check_stop(request, token_id):
                self._requests.pop(request.request_id, None)
                self.kv.free(request)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return finished

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
            self.running.remove(request)
        else:
            self.waiting.remove(request)
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
