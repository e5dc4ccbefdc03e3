"""Speculative decoding in the native engine, end to end on a tiny random llama: greedy outputs with drafts
equal those without (all drafts right, some wrong, under preemption and prefix-cache hits), KV blocks all
free afterwards, and aborts in the middle of speculative steps leave nothing behind."""

import asyncio
import dataclasses

import pytest

from backends.spec_decode.config import SpeculativeConfig
from server.engine_api import GenerateRequest
from server.scheduler.request import Request, SamplingParams
from tests.engine_helpers import (
    assert_kv_all_free,
    make_tiny_llama,
    one_torch_thread,
    random_prompts,
    run_requests,
    start_engine,
)

K = 3


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


class OracleDrafter:
    """Proposes the tokens a non-speculative run produced after the request's output so far; with
    `wrong_every`, draft position (num_output % wrong_every) is replaced by a wrong token when it exists."""

    def __init__(self, prompts: list[list[int]], outputs: list[list[int]], wrong_every: int = 0):
        self.reference = {tuple(p): o for p, o in zip(prompts, outputs, strict=True)}
        self.wrong_every = wrong_every
        self.num_proposed = 0

    def propose(self, requests: list[Request]) -> list[list[int]]:
        drafts = []
        for r in requests:
            done = r.num_output_tokens
            draft = list(self.reference[tuple(r.prompt_token_ids)][done : done + K])
            if self.wrong_every and draft:
                wrong = done % self.wrong_every
                if wrong < len(draft):
                    draft[wrong] = (draft[wrong] + 1) % 1000 + 3
            self.num_proposed += len(draft)
            drafts.append(draft)
        return drafts


def with_drafter(engine, drafter, **spec):
    engine.core.spec_config = SpeculativeConfig("ngram", K, **spec)
    engine.core.drafter = drafter
    steps = [0]
    original = engine.core.step

    def counting_step():
        steps[0] += 1
        return original()

    engine.core.step = counting_step
    return steps


def workload():
    prompts = random_prompts(8, 2000, seed=3)
    prompts[5] = prompts[4][:40] + prompts[5]  # shares 2.5 blocks with request 4: prefix-cache hits
    prompts.append(list(prompts[2]))  # the same prompt twice
    params = [
        SamplingParams(max_tokens=12 + 5 * i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))
    ]
    return prompts, params


@pytest.mark.parametrize("wrong_every", [0, 2])
@pytest.mark.parametrize("num_kv_blocks", [256, 24])  # 24 blocks of 16: requests are preempted
def test_greedy_with_drafts_equals_without(tiny_dir, wrong_every, num_kv_blocks):
    prompts, params = workload()
    args = dict(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=128)
    with one_torch_thread():
        plain_engine = start_engine(tiny_dir, **args)
        plain_steps = with_drafter(plain_engine, None)
        plain_engine.core.spec_config = None
        expected = [r["tokens"] for r in run_requests(plain_engine, prompts, params)]
        engine = start_engine(tiny_dir, **args)
        drafter = OracleDrafter(prompts, expected, wrong_every)
        steps = with_drafter(engine, drafter)
        got = run_requests(engine, prompts, params)
    assert [r["tokens"] for r in got] == expected
    assert all(r["finish_reason"] == "length" for r in got)
    stats = engine.core.scheduler.spec_stats
    assert stats.num_draft_tokens > 0
    if wrong_every == 0:  # every draft right: all accepted, fewer steps
        assert stats.num_accepted_tokens == stats.num_draft_tokens
        assert steps[0] < plain_steps[0] * 0.6, (steps[0], plain_steps[0])
    else:
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    if num_kv_blocks == 24:
        assert engine.core.scheduler.num_preemptions_total > 0
    assert engine.core.scheduler.prefix_cache_hits_total > 0
    kv = engine.core.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks() == kv.num_blocks


def test_aborts_mid_speculation_free_every_block(tiny_dir):
    prompts, params = workload()
    with one_torch_thread():
        plain = run_requests(start_engine(tiny_dir, num_kv_blocks=256), prompts, params)
        engine = start_engine(tiny_dir, num_kv_blocks=40, max_num_batched_tokens=96)
    with_drafter(engine, OracleDrafter(prompts, [r["tokens"] for r in plain], wrong_every=3))

    async def main():
        await engine.start()

        async def one(i):
            out = []
            gen = engine.generate(GenerateRequest(f"r{i}", prompts[i], params[i]))
            async for d in gen:
                out += d.token_ids
                if i % 2 and len(out) >= 4:  # odd requests: the client goes away
                    await gen.aclose()
                    return None
            return out

        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        await engine.shutdown()
        return results

    with one_torch_thread():
        results = asyncio.run(main())
    for i, tokens in enumerate(results):
        if i % 2 == 0:
            assert tokens == plain[i]["tokens"]
    kv = engine.core.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks() == kv.num_blocks and not engine.core.scheduler.has_unfinished()


def test_stop_token_among_accepted_drafts_drops_the_rest(tiny_dir):
    prompts, params = workload()
    prompts, params = prompts[:3], params[:3]
    with one_torch_thread():
        plain = [r["tokens"] for r in run_requests(start_engine(tiny_dir, num_kv_blocks=64), prompts, params)]
        stops = [SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[p[5]]) for p in plain]
        expected = run_requests(start_engine(tiny_dir, num_kv_blocks=64), prompts, stops)
        engine = start_engine(tiny_dir, num_kv_blocks=64)
        with_drafter(engine, OracleDrafter(prompts, plain))
        got = run_requests(engine, prompts, stops)
    assert got == expected
    assert all(len(r["tokens"]) <= 6 and r["finish_reason"] == "stop" for r in got)


def test_seeded_sampling_with_drafts_reproduces(tiny_dir):
    prompts, _ = workload()
    prompts = prompts[:4]
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=7 + i) for i in range(4)]
    greedy = [SamplingParams(max_tokens=20, temperature=0.0) for _ in prompts]
    runs = []
    with one_torch_thread():
        plain = [r["tokens"] for r in run_requests(start_engine(tiny_dir, num_kv_blocks=64), prompts, greedy)]
        for _ in range(2):
            engine = start_engine(tiny_dir, num_kv_blocks=64)
            with_drafter(engine, OracleDrafter(prompts, plain))  # greedy drafts: some accepted, some not
            runs.append(run_requests(engine, prompts, params))
            assert engine.core.scheduler.spec_stats.num_draft_tokens > 0
    assert runs[0] == runs[1]


def test_mtp_on_a_model_without_an_mtp_layer_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="llama has none: use method ngram"):
        start_engine(tiny_dir, num_kv_blocks=16, speculative_config={"method": "mtp"})


def test_stop_string_inside_a_step_of_accepted_drafts_cuts_there(tiny_dir):
    """All drafts right: each step hands the output processor several tokens, and a stop string that ends
    in the middle of them ends the choice there, as without speculation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = workload()[0][:3]
    greedy = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True) for _ in prompts]
    with one_torch_thread():
        plain = run_requests(start_engine(tiny_dir, num_kv_blocks=64), prompts, greedy)
        stops = []
        for p, r in zip(greedy, plain, strict=True):
            head = len(tokenizer.decode(r["tokens"][:7]))  # the stop string starts with the 8th token's text
            stops.append(dataclasses.replace(p, stop=[r["text"][head : head + 3]]))
        expected = run_requests(start_engine(tiny_dir, num_kv_blocks=64), prompts, stops)
        engine = start_engine(tiny_dir, num_kv_blocks=64)
        with_drafter(engine, OracleDrafter(prompts, [r["tokens"] for r in plain]))
        got = run_requests(engine, prompts, stops)
    assert got == expected
    assert all(r["finish_reason"] == "stop" and len(r["tokens"]) < 30 for r in got)
    assert engine.core.scheduler.spec_stats.num_accepted_tokens > 0
    assert_kv_all_free(engine)
