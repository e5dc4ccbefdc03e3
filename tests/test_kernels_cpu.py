"""glm_kernels/cpu_paged.py (C++ decode kernel, per-request SDPA prefill) against glm_kernels/reference.py, and the
engine with it installed against transformers. The kernel is compiled on first use (about 20 s here)."""

from __future__ import annotations

import random

import pytest
import torch

from glm_kernels import cpu_paged
from glm_kernels.metadata import build_step_metadata, write_rows
from glm_kernels.reference import paged_attention
from glm_kernels.registry import AttentionKernelError, get_attention_backend
from tests.engine_helpers import check_parity, make_tiny_llama, one_torch_thread, random_prompts

missing = cpu_paged.missing_build_tools()
pytestmark = pytest.mark.skipif(missing is not None, reason=f"needs {missing}")

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def cpu_metadata(starts, q_lens, tables, block_size) -> cpu_paged.CpuMetadata:
    return cpu_paged.build_cpu_metadata(build_step_metadata(starts, q_lens, tables, block_size))


def random_batch(rng: random.Random, block_size: int, n_req: int, num_blocks: int):
    """Ragged decode tokens and prefill chunks; prefixes often end mid-block, blocks lie anywhere."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    starts, q_lens, tables = [], [], []
    for _ in range(n_req):
        start = rng.choice([0, rng.randint(1, 150)])
        q_len = rng.choice([1, 1, 1, rng.randint(2, 40)])
        tables.append([free.pop() for _ in range((start + q_len + block_size - 1) // block_size)])
        starts.append(start)
        q_lens.append(q_len)
    return starts, q_lens, tables


CASES = [
    # seed, block_size, heads, kv_heads, head_dim, v_dim, dtype
    (0, 16, 9, 3, 64, 64, torch.float32),  # SmolLM2's shape (the head-dim-64 fast path)
    (1, 32, 8, 8, 128, 128, torch.float32),  # MHA, head dim 128 fast path
    (2, 16, 12, 1, 48, 48, torch.float32),  # MQA, head dim of no fast path
    (3, 8, 4, 2, 40, 24, torch.float32),  # value dim differs from key dim, small blocks
    (4, 16, 9, 3, 64, 64, torch.bfloat16),
    (5, 16, 4, 2, 64, 64, torch.float16),
    (6, 16, 32, 1, 64, 64, torch.float32),  # MQA with 32 query heads on one KV head
]


@pytest.mark.parametrize("seed,block_size,heads,kv_heads,head_dim,v_dim,dtype", CASES)
def test_matches_reference(seed, block_size, heads, kv_heads, head_dim, v_dim, dtype):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 200
    starts, q_lens, tables = random_batch(rng, block_size, 12, num_blocks)
    meta = cpu_metadata(starts, q_lens, tables, block_size)
    assert meta.decode_tokens.numel() and meta.prefill  # both paths are exercised
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, v_dim).to(dtype)
    t = meta.step.num_tokens
    write_rows(k_cache, torch.randn(t, kv_heads, head_dim), meta.step.slot_mapping)
    write_rows(v_cache, torch.randn(t, kv_heads, v_dim), meta.step.slot_mapping)
    q = torch.randn(t, heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    out = cpu_paged.paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.dtype == dtype and out.shape == (t, heads, v_dim)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])
    # A second layer of the same step (the same metadata) with other queries.
    q2 = torch.randn(t, heads, head_dim).to(dtype)
    expected2 = paged_attention(q2.float(), k_cache.float(), v_cache.float(), meta, scale)
    torch.testing.assert_close(
        cpu_paged.paged_attention(q2, k_cache, v_cache, meta, scale).float(), expected2, **TOL[dtype]
    )


def test_decode_with_one_token_of_context_and_threads():
    """A first decode token (context 1) and a batch split over several threads give the reference."""
    rng = random.Random(7)
    starts = [0] + [rng.randint(1, 300) for _ in range(40)]
    tables = []
    free = list(range(1000))
    rng.shuffle(free)
    for s in starts:
        tables.append([free.pop() for _ in range(s // 16 + 1)])
    meta = cpu_metadata(starts, [1] * len(starts), tables, 16)
    k_cache, v_cache = torch.randn(1000, 16, 2, 64), torch.randn(1000, 16, 2, 64)
    q = torch.randn(len(starts), 8, 64)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = cpu_paged.paged_attention(q, k_cache, v_cache, meta, 0.125)
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(out, paged_attention(q, k_cache, v_cache, meta, 0.125), **TOL[torch.float32])


def test_bad_inputs_are_errors_not_crashes():
    """The op checks what it would otherwise read out of bounds: block ids, lengths, cache shapes."""
    k = torch.randn(4, 16, 2, 64)
    q = torch.randn(1, 4, 64)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int32"):
        cpu_paged.paged_decode(q, k, k, tables.long(), lens, 1.0)
    with pytest.raises(RuntimeError, match="head shapes"):
        cpu_paged.paged_decode(torch.randn(1, 3, 64), k, k, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_paged.paged_decode(q.double(), k, k, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="needs more than its 1 blocks"):
        cpu_paged.paged_decode(q, k, k, tables, torch.tensor([40], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="block id 7 outside the cache's 4 blocks"):
        cpu_paged.paged_decode(q, k, k, torch.tensor([[7]], dtype=torch.int32), lens, 1.0)
    with pytest.raises(RuntimeError, match="same blocks, block size and KV heads"):
        cpu_paged.paged_decode(q, k, torch.randn(4, 16, 1, 64), tables, lens, 1.0)
    assert cpu_paged.paged_decode(q, k, k, tables, lens, 1.0).shape == (1, 4, 64)  # the valid call works


def test_registry_sets_it_up_and_reports_build_failures(monkeypatch):
    assert isinstance(get_attention_backend("cpu", "cpu"), cpu_paged.CpuBackend)
    monkeypatch.setattr(cpu_paged, "_loaded", False)
    monkeypatch.setattr(cpu_paged, "missing_build_tools", lambda: "a C++ compiler (c++ on PATH, or $CXX)")
    with pytest.raises(AttentionKernelError, match="could not be set up: .*C\\+\\+ compiler"):
        get_attention_backend("cpu", "cpu")


def test_llama_engine_with_cpu_kernel_matches_transformers(tmp_path):
    model_dir = make_tiny_llama(tmp_path)
    prompts = random_prompts(8, 49152, seed=11)
    with one_torch_thread():
        _, engine = check_parity(
            model_dir, prompts, max_new=6, attention_kernel="cpu", num_kv_blocks=64, max_num_batched_tokens=64
        )
    assert engine.core.runner.attention_kernel == "cpu"


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed midway leaves torch's lock file behind; later loads must not wait on it forever."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    cpu_paged._remove_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running right now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    cpu_paged._remove_stale_lock(tmp_path)
    assert not lock.exists()
    cpu_paged._remove_stale_lock(tmp_path)  # no lock: nothing to do


def test_a_kv_cache_dtype_other_than_the_compute_dtype_falls_back_to_the_reference(monkeypatch):
    def no_kernel(*args):
        raise AssertionError("the C++ kernel takes one dtype: it must not be called")

    monkeypatch.setattr(cpu_paged, "paged_decode", no_kernel)
    rng = random.Random(3)
    starts, q_lens, tables = random_batch(rng, 16, 6, 64)
    meta = cpu_metadata(starts, q_lens, tables, 16)
    k_cache = torch.randn(64, 16, 2, 32).to(torch.bfloat16)
    v_cache = torch.randn(64, 16, 2, 32).to(torch.bfloat16)
    q = torch.randn(meta.step.num_tokens, 4, 32)
    out = cpu_paged.paged_attention(q, k_cache, v_cache, meta, 0.2)
    torch.testing.assert_close(out, paged_attention(q, k_cache, v_cache, meta, 0.2))


def test_cpu_kernels_benchmark_smoke(tmp_path):
    """benchmarks/cpu_kernels.py end to end on tiny shapes: it checks both kernels against what they replace
    and writes its JSON (the timings of so short a run mean nothing)."""
    import json

    from benchmarks import cpu_kernels

    result = cpu_kernels.main(
        ["--batch", "3", "--context", "5", "40", "--rows", "2", "--min-time", "0.001", "--out", str(tmp_path)]
    )
    assert result["decode_attention"]["batch"] == 3
    assert len(result["linears"]) == 5 and all(r["onednn_ms"] > 0 for r in result["linears"])
    written = json.loads(next(tmp_path.glob("cpu_kernels_*.json")).read_text())
    assert written["decode_attention"]["kv_bytes"] == result["decode_attention"]["kv_bytes"]


def test_auto_falls_back_to_the_reference_when_the_build_fails(monkeypatch, caplog):
    from backends.torch_runner import attention_backend
    from server.config import EngineConfig

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else "auto" on CPU picks Triton's interpreter
    monkeypatch.setattr(cpu_paged, "_loaded", False)
    monkeypatch.setattr(cpu_paged, "missing_build_tools", lambda: "a C++ compiler (c++ on PATH, or $CXX)")
    assert attention_backend(EngineConfig(attention_kernel="auto")).name == "reference"
    assert "auto falls back to the reference kernel" in caplog.text
    with pytest.raises(AttentionKernelError, match="could not be set up"):
        attention_backend(EngineConfig(attention_kernel="cpu"))


def test_build_directory_names_the_torch_version_and_this_cpu():
    name = cpu_paged.build_dir().name
    assert name.startswith("cpu_paged_torch" + torch.__version__.replace("+", "_") + "_")
    assert len(name.rsplit("_", 1)[1]) == 12


def test_the_build_goes_under_the_engines_cache_dir(tmp_path, monkeypatch):
    """engine.cache_dir (not only GLM_SERVE_CACHE_DIR) decides where the kernel is built."""
    calls = []
    monkeypatch.setattr(cpu_paged, "_loaded", False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda **kw: calls.append(kw["build_directory"]))
    get_attention_backend("cpu", "cpu", cache_dir=str(tmp_path))
    assert calls and calls[0].startswith(str(tmp_path / "kernels" / "cpu_paged_torch"))
