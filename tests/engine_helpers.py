"""Helpers for engine tests: model directories and a synchronous way to run requests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from pathlib import Path

import torch

from backends.models.tiny import tiny_llama_config, write_tiny_llama  # noqa: F401 (tests import it here)
from server.config import EngineConfig
from server.engine import NativeEngine
from server.engine_api import GenerateRequest
from server.scheduler.request import SamplingParams


@functools.cache
def smollm_dir() -> Path:
    from backends.loader import resolve_model_dir

    return resolve_model_dir(None)


def make_tiny_llama(root: Path, seed: int = 0) -> Path:
    """A random 2-layer llama with SmolLM2's tokenizer (a real tokenizer and chat template)."""
    return write_tiny_llama(root / "tiny-llama", smollm_dir(), seed)


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


# Where start_engine runs the engine core unless told: in a thread (tests that look inside the core need it),
# or in a process of its own; the core_mode fixture (tests/conftest.py) runs a test in both.
CORE_PROCESS = False


def start_engine(model_dir: Path | None, **overrides) -> NativeEngine:
    overrides.setdefault("core_process", CORE_PROCESS)
    cfg = EngineConfig(model=str(model_dir) if model_dir else None, **overrides)
    engine = NativeEngine(cfg)
    engine.load_model()
    return engine


def assert_kv_all_free(engine: NativeEngine) -> None:
    """No request left and every KV block free: as the core last reported it (both modes), and inside the
    core with the block pool's invariants (thread mode)."""
    load = engine.load()
    assert (load.num_running, load.num_waiting, load.kv_usage) == (0, 0, 0.0), load
    if engine.core is not None:
        kv = engine.core.scheduler.kv
        kv.check_invariants()
        assert kv.num_free_blocks() == kv.num_blocks and not engine.core.scheduler.has_unfinished()


def run_requests(engine: NativeEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
    """Run all requests concurrently through the engine; returns per request its token ids, text and
    finish reason (n == 1)."""

    async def main():
        await engine.start()
        try:
            return await asyncio.gather(
                *(one(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True)))
            )
        finally:
            await engine.shutdown()

    async def one(i, prompt, sp):
        tokens, text, reason = [], "", None
        async for d in engine.generate(GenerateRequest(f"req-{i}", prompt, sp)):
            tokens += d.token_ids
            text += d.text
            reason = d.finish_reason
        return {"tokens": tokens, "text": text, "finish_reason": reason}

    return asyncio.run(main())


def record_logits(engine: NativeEngine) -> dict[str, list[torch.Tensor]]:
    """Wrap the engine's sampler to keep, per request, the logits it was given at each step."""
    seen: dict[str, list[torch.Tensor]] = {}
    sampler = engine.core.runner.sampler
    original = sampler.__call__

    def recording(logits, reqs, drafts=None):
        assert drafts is None, "record_logits keeps one row per request: run it without speculation"
        for row, req in zip(logits, reqs, strict=True):
            seen.setdefault(req.request_id, []).append(row.clone())
        return original(logits, reqs, drafts)

    engine.core.runner.sampler = type(
        "Recording", (), {"__call__": staticmethod(recording), "release": sampler.release}
    )()
    return seen


def random_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of different lengths (3 to 130 tokens) of random token ids below vocab."""
    rng = random.Random(seed)
    lengths = [3, 17, 40, 64, 95, 7, 130, 21][:n]
    return [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models run several times faster on one intra-op thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_parity(
    model_dir: Path, prompts: list[list[int]], max_new: int = 20, **overrides
) -> tuple[float, NativeEngine]:
    """Run the prompts concurrently through the engine (greedy) and through transformers' generate on the same
    checkpoint (fp32): same tokens, and every step's logits within 1e-4 relative. Returns the largest relative
    logit difference seen, and the engine (for its stats)."""
    from server.scheduler.request import SamplingParams

    engine = start_engine(model_dir, **overrides)
    logits = record_logits(engine)
    params = [SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True) for _ in prompts]
    results = run_requests(engine, prompts, params)
    ref = hf_model(model_dir)
    worst = 0.0
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        assert res["tokens"] == hf_greedy(ref, prompt, max_new), f"request {i}: greedy tokens differ"
        with torch.inference_mode():
            full = ref(torch.tensor([prompt + res["tokens"][:-1]])).logits[0, len(prompt) - 1 :]
        ours = torch.stack(logits[f"req-{i}"])
        assert ours.shape == full.shape
        rel = ((ours - full).abs().max() / full.abs().max()).item()
        assert rel < 1e-4, f"request {i}: logits differ by {rel:.2e} relative"
        worst = max(worst, rel)
    return worst, engine
