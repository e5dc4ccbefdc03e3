"""ngram speculation on SmolLM2 (the embedded default) with prompts whose answers copy their input: outputs,
logprobs and stop strings equal the non-speculative engine's, under preemption and prefix-cache hits, with
drafts accepted; the counters reach /metrics under vLLM's names."""

import asyncio

import pytest

from server.engine_api import GenerateRequest
from server.scheduler.request import SamplingParams
from tests.engine_helpers import assert_kv_all_free, smollm_dir, start_engine

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain.",
    "Milk, eggs, flour, sugar, butter, salt.",
]


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir())

    def chat(text):
        messages = [{"role": "user", "content": "Repeat this text exactly:\n\n" + text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

    return [chat(t) for t in TEXTS] + [chat(TEXTS[0])]  # the last starts when the first has its prompt cached


PARAMS = [
    SamplingParams(max_tokens=40, temperature=0.0),
    SamplingParams(max_tokens=30, temperature=0.0, logprobs=2),
    SamplingParams(max_tokens=40, temperature=0.0, stop=["Germany"]),
    SamplingParams(max_tokens=25, temperature=0.0, repetition_penalty=1.2, min_tokens=20),
    SamplingParams(max_tokens=20, temperature=0.0, presence_penalty=0.5),
]


def run(engine, prompts):
    """Every request at once; per request: tokens, text, finish reason and logprobs."""

    async def one(i, first_token: asyncio.Event):
        if i == len(prompts) - 1:
            await first_token.wait()
        tokens, text, logprobs, reason = [], "", [], None
        async for d in engine.generate(GenerateRequest(f"r{i}", prompts[i], PARAMS[i])):
            first_token.set()
            tokens += d.token_ids
            text += d.text
            logprobs += [(lp.token_id, lp.logprob, [t.token_id for t in lp.top]) for lp in d.logprobs or []]
            reason = d.finish_reason
        return tokens, text, logprobs, reason

    async def main():
        await engine.start()
        try:
            first_token = asyncio.Event()
            return await asyncio.gather(*(one(i, first_token) for i in range(len(prompts))))
        finally:
            await engine.shutdown()

    return asyncio.run(main())


@pytest.mark.usefixtures("core_mode")
@pytest.mark.parametrize("num_kv_blocks", [12])  # 12 blocks of 16 tokens: requests are preempted
def test_ngram_outputs_equal_plain_outputs(prompts, num_kv_blocks):
    plain = run(start_engine(None, num_kv_blocks=num_kv_blocks), prompts)
    engine = start_engine(None, num_kv_blocks=num_kv_blocks, speculative_config=NGRAM)
    speculative = run(engine, prompts)
    for (tokens, text, logprobs, reason), expected in zip(speculative, plain, strict=True):
        assert (tokens, text, reason) == (expected[0], expected[1], expected[3])
        assert [(t, top) for t, _, top in logprobs] == [(t, top) for t, _, top in expected[2]]
        # the verify pass batches positions differently: float sums differ in the last bits
        assert [lp for _, lp, _ in logprobs] == pytest.approx([lp for _, lp, _ in expected[2]], abs=1e-3)
    assert plain[2][3] == "stop" and plain[2][1].endswith("Berlin is the capital of ")
    assert len(plain[1][2]) == len(plain[1][0]) > 10  # a logprob per token
    stats = engine.stats()
    assert stats["spec_decode_num_accepted_tokens_total"] > 0.5 * stats["spec_decode_num_draft_tokens_total"]
    assert stats["prefix_cache_hits_total"] > 0
    if num_kv_blocks == 12:
        assert stats["num_preemptions_total"] > 0
    assert_kv_all_free(engine)
