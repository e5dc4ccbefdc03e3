"""NativeEngine behaviour: sampling reproducibility, stop strings, UTF-8, n > 1, abort, logprobs, errors."""

import asyncio

import pytest
import torch

from backends.sampler import apply_penalties, apply_top_k_top_p
from server.detokenizer import IncrementalDetokenizer
from server.engine_api import GenerateRequest
from server.scheduler.request import Request, SamplingParams
from tests.engine_helpers import make_tiny_llama, run_requests, smollm_dir, start_engine

pytestmark = pytest.mark.usefixtures("core_mode")  # each test with the core in a thread, then in a process


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir())


def _chat(tokenizer, text: str) -> list[int]:
    messages = [{"role": "user", "content": text}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )


def test_seeded_sampling_same_alone_and_in_busy_batch(tiny_dir):
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    prompt = list(range(100, 140))
    alone = run_requests(start_engine(tiny_dir, num_kv_blocks=128), [prompt], [seeded])[0]
    others = [list(range(200 + i, 230 + 3 * i)) for i in range(7)]
    noisy = [SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True) for _ in others]
    busy = run_requests(
        start_engine(tiny_dir, num_kv_blocks=128, max_num_batched_tokens=64),
        others + [prompt],
        noisy + [seeded],
    )
    assert busy[-1]["tokens"] == alone["tokens"]
    unseeded = run_requests(start_engine(tiny_dir, num_kv_blocks=128), [prompt] * 2, [noisy[0]] * 2)
    assert unseeded[0]["tokens"] != unseeded[1]["tokens"]  # different random streams without a seed


def test_stop_string_split_across_tokens(smol_tokenizer):
    prompt = _chat(smol_tokenizer, "What is the capital of France?")
    engine = start_engine(None, kv_cache_bytes=64 << 20)
    [plain, stopped, kept] = run_requests(
        engine,
        [prompt] * 3,
        [
            SamplingParams(max_tokens=30, temperature=0.0),
            SamplingParams(max_tokens=30, temperature=0.0, stop=["of Fr"]),
            SamplingParams(max_tokens=30, temperature=0.0, stop=["of Fr"], include_stop_str_in_output=True),
        ],
    )
    assert plain["text"] == "The capital of France is Paris."
    tokens = [smol_tokenizer.decode([t]) for t in plain["tokens"]]
    assert "of Fr" not in tokens  # the stop string really spans tokens
    assert stopped["text"] == "The capital " and stopped["finish_reason"] == "stop"
    assert kept["text"] == "The capital of Fr"


def test_multibyte_characters_split_across_tokens(smol_tokenizer):
    text = "héllo 😀 世界 ok"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    pieces = [smol_tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces)  # some characters really are split across tokens
    detok = IncrementalDetokenizer(smol_tokenizer, [1, 2, 3], stop=[])
    deltas = [detok.add(t, final=i == len(ids) - 1).text for i, t in enumerate(ids)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_stop_string_hold_back_never_leaks(smol_tokenizer):
    text = "alpha beta gamma STOP delta"
    ids = smol_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol_tokenizer, [], stop=["STOP"])
    out = ""
    for t in ids:
        step = detok.add(t)
        out += step.text
        if step.stop:
            break
    assert out == "alpha beta gamma " and step.stop == "STOP"


def test_n_greater_than_one_shares_prompt_blocks(tiny_dir):
    engine = start_engine(tiny_dir, num_kv_blocks=128)

    async def main():
        await engine.start()
        deltas = [
            d
            async for d in engine.generate(
                GenerateRequest(
                    "multi", list(range(50, 120)), SamplingParams(max_tokens=8, temperature=0.0), n=3
                )
            )
        ]
        await engine.shutdown()
        return deltas

    deltas = asyncio.run(main())
    by_choice: dict[int, list[int]] = {}
    cached = {}
    for d in deltas:
        by_choice.setdefault(d.index, []).extend(d.token_ids)
        cached[d.index] = d.num_cached_tokens
    assert sorted(by_choice) == [0, 1, 2]
    assert by_choice[0] == by_choice[1] == by_choice[2]  # greedy choices agree
    assert cached[1] >= 64 and cached[2] >= 64  # the later choices reused the prompt's full blocks


def test_abort_frees_blocks(tiny_dir):
    engine = start_engine(tiny_dir, num_kv_blocks=64)

    async def main():
        await engine.start()
        params = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
        gen = engine.generate(GenerateRequest("long", list(range(10, 60)), params))
        async for d in gen:
            if d.num_output_tokens >= 3:
                break
        usage_during = engine.load().kv_usage
        await gen.aclose()  # the client went away
        for _ in range(100):
            if engine.load().kv_usage == 0 and engine.load().num_running == 0:
                break
            await asyncio.sleep(0.02)
        usage_after = engine.load().kv_usage
        await engine.shutdown()
        return usage_during, usage_after

    during, after = asyncio.run(main())
    assert during > 0 and after == 0


def test_logprobs_and_top_logprobs(tiny_dir):
    engine = start_engine(tiny_dir, num_kv_blocks=64)

    async def main():
        await engine.start()
        params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)
        out = [d async for d in engine.generate(GenerateRequest("lp", list(range(5, 25)), params))]
        await engine.shutdown()
        return out

    for d in asyncio.run(main()):
        [lp] = d.logprobs
        assert len(lp.top) == 3
        assert lp.token_id == lp.top[0].token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0].logprob)
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.logprob <= 0


def test_request_that_can_never_fit_finishes_with_error(tiny_dir):
    engine = start_engine(tiny_dir, num_kv_blocks=4, block_size=16)
    [res] = run_requests(engine, [list(range(10, 110))], [SamplingParams(max_tokens=10)])
    assert res["finish_reason"] == "error"


def test_penalties_and_filters_on_logits():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    req = Request(
        "r", [0], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    )
    req.output_token_ids = [2, 2]
    out = apply_penalties(logits, [req])
    # token 0: in the prompt, positive -> halved; token 2: output twice, negative -> doubled, minus penalties
    assert out.tolist() == [[1.0, 1.0, -2.0 - 0.5 - 0.5, 0.5]]
    filtered = apply_top_k_top_p(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), [2], [1.0])
    assert torch.isinf(filtered[0, 2:]).all() and torch.isfinite(filtered[0, :2]).all()
    nucleus = apply_top_k_top_p(torch.tensor([[5.0, 1.0, 0.9, 0.0]]), [0], [0.5])
    assert torch.isfinite(nucleus[0, 0]) and torch.isinf(nucleus[0, 1:]).all()


def test_min_tokens_suppresses_eos(tiny_dir):
    engine = start_engine(tiny_dir, num_kv_blocks=64)
    eos = sorted(engine.eos_token_ids)[0]
    params = SamplingParams(
        max_tokens=6, min_tokens=6, temperature=0.0, stop_token_ids=list(range(0, 49152, 2))
    )
    [res] = run_requests(engine, [list(range(30, 40))], [params])
    assert len(res["tokens"]) == 6 and all(t % 2 == 1 for t in res["tokens"]) and eos not in res["tokens"]
