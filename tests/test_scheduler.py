"""Tests of the continuous-batching scheduler (server/scheduler/scheduler.py): unit tests, then a
hypothesis state machine over random add / step / abort / finish sequences (SchedulerMachine)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.scheduler.kv_cache import KVCacheManager
from server.scheduler.request import Request, RequestStatus, SamplingParams
from server.scheduler.scheduler import Scheduler, SchedulerOutput

EOS = 0


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    prefix_caching: bool = True,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(kv, max_num_seqs, max_num_batched_tokens, max_model_len)


def make_request(request_id: str, prompt: list[int] | int, **params: object) -> Request:
    tokens = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    return Request(request_id, tokens, SamplingParams(**params), eos_token_ids=frozenset({EOS}))


def step(
    scheduler: Scheduler, token: int | Callable[[Request], int] = 7
) -> tuple[SchedulerOutput, list[Request]]:
    """One engine step with a fake runner that samples `token` for every request that samples."""
    output = scheduler.schedule()
    pick = token if callable(token) else (lambda _request: token)
    sampled = {s.request.request_id: [pick(s.request)] for s in output.scheduled if s.sample}
    return output, scheduler.update_from_output(output, sampled)


def chunks(output: SchedulerOutput) -> dict[str, tuple[int, int, bool]]:
    return {s.request.request_id: (s.start, s.num_new_tokens, s.sample) for s in output.scheduled}


def run_to_completion(scheduler: Scheduler, max_steps: int = 1000) -> list[Request]:
    finished: list[Request] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return finished
        output, done = step(scheduler)
        finished += output.finished + done
    raise AssertionError("requests did not finish")


def test_chunked_prefill_respects_the_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    request = make_request("a", 10, max_tokens=2)
    scheduler.add(request)
    assert chunks(step(scheduler)[0]) == {"a": (0, 4, False)}
    assert chunks(step(scheduler)[0]) == {"a": (4, 4, False)}
    assert request.num_output_tokens == 0
    output, _ = step(scheduler)
    assert chunks(output) == {"a": (8, 2, True)} and output.num_batched_tokens == 2
    assert request.output_token_ids == [7] and request.num_computed_tokens == 10
    assert chunks(step(scheduler)[0]) == {"a": (10, 1, True)}
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_budget_is_shared_oldest_first() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(make_request("a", 6))
    scheduler.add(make_request("b", 6))
    output, _ = step(scheduler)
    assert chunks(output) == {"a": (0, 6, True), "b": (0, 2, False)}
    assert output.num_batched_tokens == 8
    assert chunks(step(scheduler)[0]) == {"a": (6, 1, True), "b": (2, 4, True)}


def test_decodes_are_batched_one_token_each() -> None:
    scheduler = make_scheduler()
    for name in "abc":
        scheduler.add(make_request(name, 5, max_tokens=4))
    step(scheduler)
    for expected_start in (5, 6, 7):
        output, _ = step(scheduler)
        assert chunks(output) == {name: (expected_start, 1, True) for name in "abc"}
        assert output.num_batched_tokens == 3
        for s in output.scheduled:
            assert len(s.block_ids) * 4 >= s.start + s.num_new_tokens
    assert not scheduler.has_unfinished()
    assert scheduler.kv.usage() == 0.0


def test_max_num_seqs_limits_running_requests() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add(make_request(name, 3, max_tokens=2))
    output, _ = step(scheduler)
    assert set(chunks(output)) == {"a", "b"}
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    output, finished = step(scheduler)
    assert {r.request_id for r in finished} == {"a", "b"}
    output, _ = step(scheduler)
    assert chunks(output) == {"c": (0, 3, True)}


def test_preemption_takes_the_newest_and_recomputes_it() -> None:
    # block_size 2, 4 blocks: a and b hold two blocks each after their prompts.
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=16, prefix_caching=False)
    a = make_request("a", 4, max_tokens=3)
    b = make_request("b", 4, max_tokens=3)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert scheduler.kv.num_free_blocks() == 0
    output, _ = step(scheduler, token=11)  # a's position 4 needs a third block: b goes
    assert output.preempted == [b] and chunks(output) == {"a": (4, 1, True)}
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and scheduler.num_preemptions_total == 1
    assert b.output_token_ids == [7]  # generated tokens are kept
    assert list(scheduler.waiting) == [b] and scheduler.running == [a]
    step(scheduler)  # a finishes (3 tokens); b cannot come back in the same step as a's last
    output, _ = step(scheduler)
    assert chunks(output) == {"b": (0, 5, True)}  # recompute prompt + generated token
    assert b.status is RequestStatus.RUNNING
    run_to_completion(scheduler)
    assert a.output_token_ids == [7, 11, 7] and b.num_output_tokens == 3
    assert b.num_cached_tokens == 0
    assert scheduler.kv.num_free_blocks() == 4


def test_preemption_of_the_current_request_when_it_is_the_newest() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=16)
    a = make_request("a", 3, max_tokens=3)  # after the prompt, decode stays in its second block
    b = make_request("b", 4, max_tokens=3)  # after the prompt, decode needs a third block
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    output, _ = step(scheduler)
    assert output.preempted == [b] and chunks(output) == {"a": (3, 1, True)}
    assert scheduler.waiting[0] is b and scheduler.num_running == 1


def test_preempted_requests_go_back_to_the_front_of_the_queue() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_num_seqs=2, max_num_batched_tokens=16)
    a, b, c = (make_request(name, 4, max_tokens=3) for name in "abc")
    for request in (a, b, c):
        scheduler.add(request)
    step(scheduler)
    output, _ = step(scheduler)
    assert output.preempted == [b]
    assert list(scheduler.waiting) == [b, c]
    assert not any(s.request is c for s in output.scheduled)  # no admission in a step that preempted


def test_waiting_requests_are_not_admitted_out_of_order() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    scheduler.add(make_request("a", 8, max_tokens=8))  # two blocks, grows to four
    scheduler.add(make_request("big", 12, max_tokens=1))  # needs three blocks
    scheduler.add(make_request("small", 2, max_tokens=1))  # would fit, but must wait its turn
    output, _ = step(scheduler)
    assert set(chunks(output)) == {"a"}
    assert [r.request_id for r in scheduler.waiting] == ["big", "small"]


def test_requests_that_can_never_fit_are_refused() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    too_long = make_request("too_long", 10, max_tokens=7)  # 17 tokens: 5 blocks > 4
    no_room = make_request("no_room", 64, max_tokens=1)  # prompt fills the context
    capped = make_request("capped", 10, max_tokens=1000)
    scheduler.add(too_long)
    scheduler.add(no_room)
    assert too_long.status is RequestStatus.FINISHED_ERROR and "KV cache" in (too_long.error or "")
    assert no_room.status is RequestStatus.FINISHED_ERROR and "context length" in (no_room.error or "")
    assert scheduler.has_unfinished() and scheduler.num_waiting == 0
    output = scheduler.schedule()
    assert output.finished == [too_long, no_room] and output.scheduled == []
    assert not scheduler.has_unfinished()
    small = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    small.add(capped)  # prompt + max_tokens is huge, but max_model_len caps it to 4 blocks
    assert capped.status is RequestStatus.WAITING
    finished = run_to_completion(small)
    assert finished == [capped] and capped.status is RequestStatus.FINISHED_LENGTH
    assert capped.num_tokens == 16


def test_min_tokens_suppresses_eos() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 3, max_tokens=10, min_tokens=3)
    scheduler.add(request)
    results = [step(scheduler, token=EOS)[1] for _ in range(3)]
    assert results == [[], [], [request]]
    assert request.output_token_ids == [EOS] * 3
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_reason is None


def test_eos_stops_at_once_and_ignore_eos_runs_to_max_tokens() -> None:
    scheduler = make_scheduler()
    stops = make_request("stops", 3, max_tokens=10)
    ignores = make_request("ignores", 3, max_tokens=4, ignore_eos=True)
    scheduler.add(stops)
    scheduler.add(ignores)
    _, finished = step(scheduler, token=EOS)
    assert finished == [stops] and stops.status is RequestStatus.FINISHED_STOPPED
    for _ in range(3):
        _, finished = step(scheduler, token=EOS)
    assert finished == [ignores] and ignores.status is RequestStatus.FINISHED_LENGTH
    assert ignores.output_token_ids == [EOS] * 4


def test_stop_token_ids_set_the_stop_reason() -> None:
    scheduler = make_scheduler()
    request = make_request("a", 3, max_tokens=10, stop_token_ids=[42], min_tokens=1)
    scheduler.add(request)
    step(scheduler, token=5)
    _, finished = step(scheduler, token=42)
    assert finished == [request]
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_reason == 42
    assert request.status.finish_reason == "stop"


def test_max_model_len_ends_generation() -> None:
    scheduler = make_scheduler(max_model_len=8)
    request = make_request("a", 5, max_tokens=100)
    scheduler.add(request)
    finished = run_to_completion(scheduler)
    assert finished == [request] and request.status is RequestStatus.FINISHED_LENGTH
    assert request.num_tokens == 8 and request.num_output_tokens == 3


def test_abort_frees_blocks_at_once() -> None:
    scheduler = make_scheduler(num_blocks=16, max_num_seqs=1)
    running = make_request("running", 9, max_tokens=5)
    waiting = make_request("waiting", 9, max_tokens=5)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler)
    assert scheduler.kv.num_free_blocks() == 13
    assert scheduler.abort(["running", "waiting", "unknown"]) == [running, waiting]
    assert running.status is RequestStatus.FINISHED_ABORTED and waiting.status.finish_reason == "abort"
    assert scheduler.kv.num_free_blocks() == 16 and scheduler.kv.usage() == 0.0
    assert not scheduler.has_unfinished() and scheduler.num_running == scheduler.num_waiting == 0
    assert scheduler.abort("running") == []


def test_finish_between_schedule_and_update_is_skipped() -> None:
    scheduler = make_scheduler()
    a, b = make_request("a", 4, max_tokens=5), make_request("b", 4, max_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    output = scheduler.schedule()
    assert scheduler.finish("a", RequestStatus.FINISHED_STOPPED, stop_reason="</s>") is a
    assert a.stop_reason == "</s>" and scheduler.kv.block_table("a") == []
    finished = scheduler.update_from_output(output, {"b": [7]})  # the runner dropped a's token
    assert finished == [] and a.output_token_ids == [] and b.output_token_ids == [7]
    assert scheduler.finish("a", RequestStatus.FINISHED_ABORTED) is None
    assert scheduler.running == [b] and scheduler.get_request("a") is None
    assert scheduler.get_request("b") is b
    with pytest.raises(ValueError):
        scheduler.finish("b", RequestStatus.RUNNING)


def test_prefix_cached_request_computes_only_the_uncached_tail() -> None:
    scheduler = make_scheduler(block_size=4)
    prompt = list(range(200, 216))
    first = make_request("first", prompt, max_tokens=1)
    scheduler.add(first)
    run_to_completion(scheduler)
    second = make_request("second", prompt[:14] + [1, 2], max_tokens=1)
    scheduler.add(second)
    output, _ = step(scheduler)
    assert chunks(output) == {"second": (12, 4, True)}
    assert second.num_cached_tokens == 12
    identical = make_request("identical", prompt, max_tokens=1)
    scheduler.add(identical)
    output, _ = step(scheduler)
    assert chunks(output) == {"identical": (12, 4, True)}  # the last block is computed to sample
    assert scheduler.kv.usage() == 0.0


def test_duplicate_ids_and_bad_requests() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 3))
    with pytest.raises(ValueError):
        scheduler.add(make_request("a", 3))
    empty = make_request("empty", [])
    zero = make_request("zero", 3, max_tokens=0)
    scheduler.add(empty)
    scheduler.add(zero)
    assert empty.status is zero.status is RequestStatus.FINISHED_ERROR
    assert scheduler.schedule().finished == [empty, zero]


def test_recompute_after_preemption_reuses_the_cached_prefix() -> None:
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=16)
    a, b = make_request("a", 4, max_tokens=3), make_request("b", [1, 2, 3, 4], max_tokens=3)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert step(scheduler)[0].preempted == [b]  # a's new block evicted b's tail, not its head
    step(scheduler)
    output, _ = step(scheduler)
    assert chunks(output) == {"b": (2, 3, True)}
    assert b.num_cached_tokens == 0  # reported cache hits count the first schedule only


# -- random sequences ------------------------------------------------------------------------------

VOCAB = 6  # sampled tokens: 0 is EOS, 3 is a stop token for requests that ask for it
SHARED_PREFIX = [1, 2, 3, 4, 5] * 3


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / abort / finish with a fake runner that keeps a simulated KV memory: every
    chunk must read the tokens it expects from its block table and write only blocks it owns alone."""

    @initialize(
        block_size=st.integers(1, 4),
        max_model_len=st.integers(6, 32),
        extra_blocks=st.integers(-3, 4),  # below 0, some long requests can never fit
        max_num_seqs=st.integers(1, 6),
        budget=st.integers(1, 12),
        caching=st.booleans(),
    )
    def configure(
        self,
        block_size: int,
        max_model_len: int,
        extra_blocks: int,
        max_num_seqs: int,
        budget: int,
        caching: bool,
    ) -> None:
        num_blocks = max(1, -(-max_model_len // block_size) + extra_blocks)
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.scheduler = Scheduler(kv, max_num_seqs, budget, max_model_len)
        self.memory: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.requests: list[Request] = []
        self.reported: set[str] = set()

    def report(self, requests: list[Request]) -> None:
        for request in requests:
            assert request.is_finished and request.request_id not in self.reported
            self.reported.add(request.request_id)
            assert self.scheduler.kv.block_table(request.request_id) == []

    @rule(
        shared=st.integers(0, 12),
        tail=st.lists(st.integers(1, 3), max_size=6),
        max_tokens=st.integers(1, 12),
        min_tokens=st.integers(0, 3),
        ignore_eos=st.booleans(),
        stop=st.booleans(),
    )
    def add(
        self, shared: int, tail: list[int], max_tokens: int, min_tokens: int, ignore_eos: bool, stop: bool
    ) -> None:
        prompt = SHARED_PREFIX[:shared] + tail  # common prefixes exercise the prefix cache
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=ignore_eos,
            stop_token_ids=[3] if stop else [],
        )
        request = Request(f"r{len(self.requests)}", prompt, params, eos_token_ids=frozenset({0}))
        self.requests.append(request)
        self.scheduler.add(request)
        kv, max_len = self.scheduler.kv, self.scheduler.max_model_len
        fits = (
            0 < len(prompt) < max_len
            and -(-min(len(prompt) + max_tokens, max_len) // kv.block_size) <= kv.num_blocks
        )
        assert request.status is (RequestStatus.WAITING if fits else RequestStatus.FINISHED_ERROR)

    @rule(seed=st.integers(0, 2**32 - 1), abort_midway=st.booleans(), speculate=st.booleans())
    def step(self, seed: int, abort_midway: bool, speculate: bool) -> None:
        scheduler, kv = self.scheduler, self.scheduler.kv
        had_work = scheduler.num_running + scheduler.num_waiting > 0
        output = scheduler.schedule()
        self.check_output(output)
        assert output.num_batched_tokens > 0 or not had_work, "no progress"
        self.report(output.finished)
        rng = random.Random(seed)
        if abort_midway and output.scheduled:
            victim = rng.choice(output.scheduled).request
            self.report(scheduler.abort([victim.request_id]))
        sampled = {  # speculative decoding: a random prefix of the drafts is accepted, then one token
            s.request.request_id: s.draft_token_ids[: rng.randint(0, len(s.draft_token_ids))]
            + [rng.randrange(VOCAB)]
            for s in output.scheduled
            if s.sample
        }
        self.report(scheduler.update_from_output(output, sampled))
        for s in output.scheduled:
            if s.sample and s.request.status is not RequestStatus.FINISHED_ABORTED:
                self.check_stop(s.request)
        kv.check_invariants()
        if speculate:  # drafts for the next step, as the engine's drafter would set them
            for request in scheduler.running:
                request.spec_token_ids = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 3))]

    def check_stop(self, request: Request) -> None:
        """The status after a sampled token is what the stop rules say, in their order of precedence."""
        params, token = request.params, request.output_token_ids[-1]
        may_stop = request.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and token in request.eos_token_ids:
            assert (request.status, request.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)
        elif may_stop and token in params.stop_token_ids:
            assert (request.status, request.stop_reason) == (RequestStatus.FINISHED_STOPPED, token)
        elif (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.scheduler.max_model_len
        ):
            assert request.status is RequestStatus.FINISHED_LENGTH
        else:
            assert request.status is RequestStatus.RUNNING

    def check_output(self, output: SchedulerOutput) -> None:
        scheduler, kv = self.scheduler, self.scheduler.kv
        size = kv.block_size
        assert output.num_batched_tokens == sum(s.num_new_tokens for s in output.scheduled)
        assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
        assert scheduler.num_running <= scheduler.max_num_seqs
        assert len({s.request.request_id for s in output.scheduled}) == len(output.scheduled)
        for request in output.preempted:
            assert request.status is RequestStatus.PREEMPTED and request.num_computed_tokens == 0
            assert kv.block_table(request.request_id) == [] and request in scheduler.waiting
        for s in output.scheduled:
            request, end = s.request, s.start + s.num_new_tokens
            num_drafts = len(s.draft_token_ids)
            assert request.status is RequestStatus.RUNNING and s.start == request.num_computed_tokens
            assert s.num_new_tokens > 0 and end - num_drafts <= request.num_tokens
            assert s.sample == (end - num_drafts == request.num_tokens)
            if num_drafts:  # only a decoding request verifies drafts, within its limits
                assert s.start == request.num_tokens - 1
                assert request.num_output_tokens + num_drafts < request.params.max_tokens
                assert request.num_tokens + num_drafts < scheduler.max_model_len
            assert s.block_ids == kv.block_table(request.request_id) and len(s.block_ids) * size >= end
            for position in range(s.start):
                block = s.block_ids[position // size]
                assert self.memory[block][position % size] == request.token_id(position), "stale KV"
            for index in range(s.start // size, -(-end // size)):
                assert kv.ref_count(s.block_ids[index]) == 1, "writes into a shared block"
        for s in output.scheduled:
            tokens = s.request.all_token_ids() + s.draft_token_ids
            for position in range(s.start, s.start + s.num_new_tokens):
                self.memory[s.block_ids[position // size]][position % size] = tokens[position]

    @precondition(lambda self: self.scheduler.has_unfinished())
    @rule(data=st.data(), abort=st.booleans())
    def finish_one(self, data: st.DataObject, abort: bool) -> None:
        unfinished = [r for r in self.requests if not r.is_finished]
        if not unfinished:
            return
        request = data.draw(st.sampled_from(unfinished))
        if abort:
            assert self.scheduler.abort(request.request_id) == [request]
        else:
            assert (
                self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED, "stop") is request
            )
            assert request.stop_reason == "stop"
        self.report([request])
        assert self.scheduler.get_request(request.request_id) is None

    @invariant()
    def requests_are_consistent(self) -> None:
        scheduler = self.scheduler
        for request in self.requests:
            assert request.num_output_tokens <= request.params.max_tokens
            assert request.num_tokens <= scheduler.max_model_len or request.num_output_tokens == 0
        for request in scheduler.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert scheduler.kv.block_table(request.request_id) == [] and request.num_computed_tokens == 0
        assert all(r.status is RequestStatus.RUNNING for r in scheduler.running)
        if not scheduler.running:
            assert scheduler.kv.usage() == 0.0

    def teardown(self) -> None:
        scheduler = getattr(self, "scheduler", None)
        if scheduler is None:
            return
        unfinished = [r for r in self.requests if not r.is_finished]
        bound = 1 + sum(min(r.max_total_tokens, scheduler.max_model_len) for r in unfinished)
        for _ in range(bound):
            if not scheduler.has_unfinished():
                break
            self.step(seed=len(self.reported), abort_midway=False, speculate=True)
        assert not scheduler.has_unfinished(), f"not drained within {bound} steps"
        assert {r.request_id for r in self.requests} == self.reported
        assert scheduler.kv.num_free_blocks() == scheduler.kv.num_blocks and scheduler.kv.usage() == 0.0


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
