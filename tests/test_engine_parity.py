"""The native engine against Hugging Face transformers on the same weights (fp32): same greedy tokens and
step logits within 1e-4 relative, with many concurrent requests, chunked prefill and preemption."""

import random

import pytest
import torch

from server.scheduler.request import SamplingParams
from tests.engine_helpers import (
    hf_greedy,
    hf_model,
    make_tiny_llama,
    record_logits,
    run_requests,
    smollm_dir,
    start_engine,
)

MAX_NEW = 20


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 17, 40, 64, 95, 130, 7, 200][:n]
    return [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]


def _check_parity(model_dir, prompts, **engine_overrides):
    engine = start_engine(model_dir, **engine_overrides)
    logits = record_logits(engine)
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True) for _ in prompts]
    results = run_requests(engine, prompts, params)
    ref = hf_model(model_dir)
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        expected = hf_greedy(ref, prompt, MAX_NEW)
        assert res["tokens"] == expected, f"request {i}: greedy tokens differ"
        with torch.inference_mode():
            full = ref(torch.tensor([prompt + res["tokens"][:-1]])).logits[0, len(prompt) - 1 :]
        ours = torch.stack(logits[f"req-{i}"])
        assert ours.shape == full.shape
        rel = (ours - full).abs().max() / full.abs().max()
        assert rel < 1e-4, f"request {i}: logits differ by {rel:.2e} relative"
    return engine


def test_tiny_llama_parity_with_chunked_prefill(tmp_path):
    model_dir = make_tiny_llama(tmp_path)
    prompts = _prompts(8, 49152)
    _check_parity(model_dir, prompts, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16)


def test_tiny_llama_parity_under_preemption(tmp_path):
    """A KV budget too small for all requests at once: preemption by recompute, same greedy tokens."""
    model_dir = make_tiny_llama(tmp_path)
    prompts = _prompts(8, 49152, seed=1)
    engine = _check_parity(model_dir, prompts, max_num_batched_tokens=256, num_kv_blocks=24, block_size=16)
    assert engine.stats()["num_preemptions_total"] > 0


@pytest.mark.slow
def test_smollm2_parity():
    model_dir = smollm_dir()
    prompts = _prompts(8, 49152, seed=2)
    _check_parity(model_dir, prompts, max_num_batched_tokens=128, kv_cache_bytes=256 << 20)


def test_smollm2_answers_paris():
    engine = start_engine(None, kv_cache_bytes=128 << 20)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    [res] = run_requests(engine, [prompt], [SamplingParams(max_tokens=30, temperature=0.0)])
    assert res["text"] == "The capital of France is Paris."
    assert res["finish_reason"] == "stop"
