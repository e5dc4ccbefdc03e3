"""Tensor parallelism of the native engine on CPU over gloo: TP=2 gives the same greedy tokens and (nearly) the
same logits as TP=1, workers exit at shutdown, and a failed or stuck worker becomes an engine error."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from backends.loader import iter_safetensors
from backends.models.tiny import build_glm_tokenizer, write_random_model, write_tiny_glm5
from backends.parallel import TensorParallel, attention_heads, use
from backends.tp_worker import TPWorkerError
from server.engine_api import EngineDeadError, GenerateRequest
from server.scheduler.request import SamplingParams
from tests.engine_helpers import (
    make_tiny_llama,
    random_prompts,
    record_logits,
    run_requests,
)
from tests.engine_helpers import start_engine as _start_engine

pytestmark = pytest.mark.usefixtures("single_torch_thread")

MAX_NEW = 12
ENGINE = dict(max_num_batched_tokens=40, num_kv_blocks=96, block_size=16, num_threads=1)


def start_engine(model_dir, tp: int, **overrides):
    return _start_engine(model_dir, tensor_parallel_size=tp, **{**ENGINE, **overrides})


def greedy(engine, prompts):
    """Tokens and per-step logits of every prompt, and the worker processes the engine had."""
    procs = list(engine.core.runner.workers.procs) if engine.core.runner.workers else []
    logits = record_logits(engine)
    params = [SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True) for _ in prompts]
    results = run_requests(engine, prompts, params)
    return [r["tokens"] for r in results], logits, procs


def assert_tp2_matches_tp1(model_dir, prompts) -> None:
    tokens1, logits1, _ = greedy(start_engine(model_dir, 1), prompts)
    tokens2, logits2, procs = greedy(start_engine(model_dir, 2), prompts)
    assert tokens2 == tokens1
    worst = 0.0
    for rid, steps in logits1.items():
        one, two = torch.stack(steps), torch.stack(logits2[rid])
        assert one.shape == two.shape
        rel = ((two - one).abs().max() / one.abs().max()).item()
        assert rel < 1e-4, f"{rid}: logits differ by {rel:.1e} relative"
        worst = max(worst, rel)
    print(f"{model_dir.name}: TP=2 vs TP=1 max relative logit difference {worst:.1e}")
    assert_workers_gone(procs)


def assert_workers_gone(procs, clean: bool = True) -> None:
    assert len(procs) == 1
    assert all(not p.is_alive() for p in procs), "a worker outlived the engine"
    if clean:
        assert [p.exitcode for p in procs] == [0]
    assert not dist.is_initialized(), "the process group outlived the engine"


def test_tiny_llama_tp2_matches_tp1_with_chunked_prefill(tmp_path):
    """4 query heads / 2 KV heads split over 2 ranks; vocabulary split for the embedding and the head."""
    assert_tp2_matches_tp1(make_tiny_llama(tmp_path), random_prompts(6, 49152))


def test_tiny_glm4_moe_tp2_matches_tp1(tmp_path):
    """GQA heads split, 8 experts 4 per rank, shared expert split; an odd vocabulary pads the last shard."""
    from tests.test_models_glm4_moe import tiny_config

    model_dir = write_random_model(tiny_config(767), tmp_path / "glm4-moe", build_glm_tokenizer())
    assert_tp2_matches_tp1(model_dir, random_prompts(6, 700, seed=1))


def test_tiny_glm5_tp2_matches_tp1(tmp_path):
    """MLA heads split, latent cache and DSA indexer replicated on both ranks."""
    assert_tp2_matches_tp1(write_tiny_glm5(tmp_path / "glm5"), random_prompts(4, 700, seed=5))


def test_each_rank_loads_its_part_of_the_checkpoint(tmp_path):
    """In one process: the two ranks' shards, read lazily, put back together are the checkpoint."""
    from transformers import AutoConfig

    from backends.models.llama import LlamaForCausalLM

    model_dir = make_tiny_llama(tmp_path)
    config = AutoConfig.from_pretrained(model_dir)
    full = dict(iter_safetensors(model_dir))
    shards = []
    for rank in range(2):
        with use(TensorParallel(rank, 2)):
            model = LlamaForCausalLM(config)
        model.load_weights(iter_safetensors(model_dir, lazy=True))
        shards.append(model.state_dict())
    attn = "layers.1.self_attn"
    q = torch.cat([s[f"{attn}.qkv.weight"][:32] for s in shards])
    k = torch.cat([s[f"{attn}.qkv.weight"][32:48] for s in shards])
    assert torch.equal(q, full[f"model.{attn}.q_proj.weight"])
    assert torch.equal(k, full[f"model.{attn}.k_proj.weight"])
    o = torch.cat([s[f"{attn}.o_proj.weight"] for s in shards], dim=1)
    assert torch.equal(o, full[f"model.{attn}.o_proj.weight"])
    down = torch.cat([s["layers.0.mlp.down.weight"] for s in shards], dim=1)
    assert torch.equal(down, full["model.layers.0.mlp.down_proj.weight"])
    head = torch.cat([s["lm_head.weight"] for s in shards])
    assert torch.equal(head, full["lm_head.weight"])


def test_head_split_and_clear_errors():
    assert attention_heads(TensorParallel(1, 2), 4, 2) == ((2, 2), (1, 1))
    # tp larger than the KV heads: each rank keeps a replica of the one KV head its query heads read
    assert [attention_heads(TensorParallel(r, 4), 8, 2)[1] for r in range(4)] == [
        (0, 1),
        (0, 1),
        (1, 1),
        (1, 1),
    ]
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(9\) is not divisible by tensor_parallel_size 2"
    ):
        attention_heads(TensorParallel(0, 2), 9, 3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        attention_heads(TensorParallel(0, 4), 8, 3)


def test_indivisible_heads_fail_at_load_without_leaking_workers(tmp_path):
    model_dir = make_tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size 3"):
        start_engine(model_dir, 3)
    assert not dist.is_initialized()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("glm-serve-tp")]


def test_worker_that_fails_to_load_is_reported(tmp_path):
    """A checkpoint without layer 1's experts 4-7: rank 0 (experts 0-3) loads, rank 1 (experts 4-7) fails;
    the engine reports rank 1's error instead of waiting for it."""
    from safetensors.torch import load_file, save_file

    from tests.test_models_glm4_moe import tiny_config

    model_dir = write_random_model(tiny_config(768), tmp_path / "glm4-moe", build_glm_tokenizer())
    [file] = model_dir.glob("*.safetensors")
    drop = tuple(f"layers.1.mlp.experts.{e}." for e in range(4, 8))
    tensors = {k: v for k, v in load_file(file).items() if not any(d in k for d in drop)}
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(TPWorkerError, match="(?s)worker rank 1 failed while loading.*checkpoint is missing"):
        start_engine(model_dir, 2).runner.shutdown()  # shutdown: not reached when the load fails
    assert not dist.is_initialized()
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("glm-serve-tp")]


def _fail_worker(tmp_path, sig: signal.Signals) -> str:
    """Run one request, hit the worker with `sig`, run another: returns the engine's error."""
    engine = start_engine(make_tiny_llama(tmp_path), 2)
    [worker] = engine.core.runner.workers.procs
    prompt = random_prompts(1, 49152)[0]

    async def main():
        await engine.start()
        try:
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            async for _ in engine.generate(GenerateRequest("ok", prompt, params)):
                pass
            os.kill(worker.pid, sig)
            t0 = time.monotonic()
            with pytest.raises(EngineDeadError) as err:
                async for _ in engine.generate(GenerateRequest("after", prompt, params)):
                    pass
            assert time.monotonic() - t0 < 30
            assert not engine.healthy()
            return str(err.value)
        finally:
            await engine.shutdown()

    message = asyncio.run(main())
    assert_workers_gone([worker], clean=False)
    return message


def test_dead_worker_is_an_engine_error(tmp_path):
    message = _fail_worker(tmp_path, signal.SIGKILL)
    assert "worker(s) died: rank 1 (exit code -9)" in message


def test_stuck_worker_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_SERVE_TP_TIMEOUT_S", "3")
    message = _fail_worker(tmp_path, signal.SIGSTOP)
    assert "collective failed" in message and "3s timeout" in message
