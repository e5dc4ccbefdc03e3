"""glm_kernels/ascend.py and glm_kernels/cambricon.py against the plain-torch references, through the FAKE vendor
modules of tests/fakes (plain-torch implementations of the ops' documented semantics, which check the
documented argument constraints). They prove the layouts and lengths we pass, not the vendor numerics."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from glm_kernels import ascend, cambricon
from glm_kernels.metadata import build_step_metadata, write_rows
from glm_kernels.mla_reference import dsa_topk
from glm_kernels.mla_reference import mla_paged_attention as reference_mla_attention
from glm_kernels.reference import paged_attention
from tests.fakes import install_fake
from tests.fakes.common import FakeOpError

TOL = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}
# a decode row with its context ending mid-block, two decode rows, a chunk over a prefix ending mid-block,
# a chunk longer than FIA-MLA's 16 queries, and a first chunk
STARTS, Q_LENS = [150, 37, 0, 21, 0], [1, 1, 1, 27, 9]


def tables_for(block_size: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    return [
        [free.pop() for _ in range((s + q + block_size - 1) // block_size)]
        for s, q in zip(STARTS, Q_LENS, strict=True)
    ]


def step_for(tables: list[list[int]], block_size: int):
    return build_step_metadata(STARTS, Q_LENS, tables, block_size)


def ascend_meta(step) -> ascend.AscendMetadata:
    return ascend.build_ascend_metadata(step, ascend.causal_mask(step.device))


def gqa_case(dtype: torch.dtype, block_size: int, heads: int = 8, kv_heads: int = 2, dim: int = 64):
    """Block-major caches and the step; the metadata is each backend's (ascend_meta, cambricon's builder)."""
    torch.manual_seed(0)
    step = step_for(tables_for(block_size, 24), block_size)
    k_cache = torch.randn(24, block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(24, block_size, kv_heads, dim).to(dtype)
    total = sum(Q_LENS)
    write_rows(k_cache, torch.randn(total, kv_heads, dim), step.slot_mapping)
    write_rows(v_cache, torch.randn(total, kv_heads, dim), step.slot_mapping)
    q = torch.randn(total, heads, dim).to(dtype)
    meta = ascend_meta(step)
    expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, dim**-0.5)
    return q, k_cache, v_cache, step, expected


def mla_case(dtype: torch.dtype, block_size: int, heads: int = 32, rank: int = 512, rope: int = 64):
    torch.manual_seed(1)
    step = step_for(tables_for(block_size, 24, seed=1), block_size)
    total = sum(Q_LENS)
    cache = torch.randn(24, block_size, rank + rope).to(dtype)
    write_rows(cache, torch.randn(total, rank + rope), step.slot_mapping)
    q_nope, q_pe = torch.randn(total, heads, rank).to(dtype), torch.randn(total, heads, rope).to(dtype)
    return q_nope, q_pe, cache, step, (rank + rope) ** -0.5


def split(cache: torch.Tensor, rank: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    return cache[..., :rank].contiguous(), cache[..., rank:].contiguous()


def some_topk(meta, k: int = 24) -> torch.Tensor:
    """A DSA selection as index lists, with -1 padding interleaved with the real entries."""
    torch.manual_seed(2)
    total = meta.step.num_tokens
    keys = torch.randn(24, meta.step.block_size, 16)
    topk = dsa_topk(torch.randn(total, 2, 16), torch.randn(total, 2), keys, meta, k, 0.3)
    topk = torch.cat([topk, torch.full((total, 4), -1, dtype=torch.int32)], dim=1)
    return topk[:, torch.randperm(k + 4)]


def check(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out.float(), expected.float(), **TOL[out.dtype])


@pytest.fixture()
def npu(monkeypatch):
    fake = install_fake(monkeypatch, "torch_npu")
    fake.calls.clear()
    return fake


@pytest.fixture()
def tmo(monkeypatch):
    install_fake(monkeypatch, "torch_mlu")
    fake = install_fake(monkeypatch, "torch_mlu_ops")
    fake.calls.clear()
    return fake


# -- Ascend ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ascend_gqa_matches_reference(npu, dtype):
    q, k_cache, v_cache, step, expected = gqa_case(dtype, block_size=128)
    check(ascend.paged_attention(q, k_cache, v_cache, ascend_meta(step), 64**-0.5), expected)
    assert npu.calls == ["_npu_paged_attention", "npu_fused_infer_attention_score"]


def test_ascend_prefill_block_size_is_a_clear_error(npu):
    q, k_cache, v_cache, step, _ = gqa_case(torch.float16, block_size=16)
    with pytest.raises(ValueError, match=r"engine.block_size in \(128, 256, 384, 512\)"):
        ascend.paged_attention(q, k_cache, v_cache, ascend_meta(step), 0.1)


def test_ascend_mla_matches_reference(npu):
    q_nope, q_pe, cache, step, scale = mla_case(torch.bfloat16, block_size=16)
    meta = ascend_meta(step)
    out = ascend.mla_paged_attention(q_nope, q_pe, *split(cache), meta, scale)
    check(out, reference_mla_attention(q_nope.float(), q_pe.float(), cache.float(), meta, scale))
    assert npu.calls == ["npu_fused_infer_attention_score"] * 2  # decode group, then prefill pieces


def test_ascend_mla_sparse_topk_matches_reference(npu):
    q_nope, q_pe, cache, step, scale = mla_case(torch.float16, block_size=16)
    meta = ascend_meta(step)
    topk = some_topk(meta)
    out = ascend.mla_paged_attention(q_nope, q_pe, *split(cache), meta, scale, topk)
    check(out, reference_mla_attention(q_nope.float(), q_pe.float(), cache.float(), meta, scale, topk))
    assert set(npu.calls) == {"npu_sparse_flash_attention"}


def test_ascend_sparse_falls_back_to_reference_without_the_op(npu, monkeypatch):
    monkeypatch.delattr(npu, "npu_sparse_flash_attention")
    q_nope, q_pe, cache, step, scale = mla_case(torch.float16, block_size=16)
    meta = ascend_meta(step)
    topk = some_topk(meta)
    out = ascend.mla_paged_attention(q_nope, q_pe, *split(cache), meta, scale, topk)
    check(out, reference_mla_attention(q_nope.float(), q_pe.float(), cache.float(), meta, scale, topk))
    assert npu.calls == []


def test_fake_rejects_what_the_docs_forbid(npu):
    """The fake is only useful if it is strict: a non-host context_lens is refused, as the op requires."""
    q, k_cache, v_cache, _, _ = gqa_case(torch.float16, block_size=128)
    out = torch.empty(1, 8, 64, dtype=torch.float16)
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(FakeOpError, match="context_lens"):
        npu._npu_paged_attention(q[:1], k_cache, v_cache, 2, 8, 0.1, table, torch.tensor([3]), out)


# -- Cambricon -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,block_size", [(torch.float16, 16), (torch.bfloat16, 32)])
def test_cambricon_gqa_matches_reference(tmo, dtype, block_size):
    q, k_cache, v_cache, step, expected = gqa_case(dtype, block_size)
    head_major_k = k_cache.permute(0, 2, 1, 3).contiguous()  # TMO's [num_blocks, kv_heads, block_size, dim]
    head_major_v = v_cache.permute(0, 2, 1, 3).contiguous()
    meta = cambricon.build_cambricon_metadata(step)
    check(cambricon.paged_attention(q, head_major_k, head_major_v, meta, 64**-0.5), expected)
    assert tmo.calls == ["single_query_cached_kv_attn", "flash_attention"]


def test_cambricon_mla_matches_reference(tmo):
    q_nope, q_pe, cache, step, scale = mla_case(torch.float16, block_size=16, heads=4, rank=64, rope=32)
    meta = cambricon.build_cambricon_metadata(step)
    out = cambricon.mla_paged_attention(q_nope, q_pe, cache, meta, scale)
    check(out, reference_mla_attention(q_nope.float(), q_pe.float(), cache.float(), meta, scale))
    assert tmo.calls == ["single_query_cached_kv_attn", "flash_attention"]


def test_cambricon_sparse_topk_runs_on_the_reference(tmo):
    q_nope, q_pe, cache, step, scale = mla_case(torch.float16, block_size=16, heads=4, rank=64, rope=32)
    meta = cambricon.build_cambricon_metadata(step)
    topk = some_topk(meta)
    out = cambricon.mla_paged_attention(q_nope, q_pe, cache, meta, scale, topk)
    check(out, reference_mla_attention(q_nope.float(), q_pe.float(), cache.float(), meta, scale, topk))
    assert tmo.calls == []


# -- lazy imports ----------------------------------------------------------------------------------------
def test_wrappers_import_no_vendor_library():
    code = (
        "import sys, glm_kernels.ascend, glm_kernels.cambricon, glm_kernels.registry; "
        "print(sorted(m for m in ('torch_npu', 'torch_mlu', 'torch_mlu_ops', 'triton') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_vendor_library_names_it():
    if "torch_npu" in sys.modules:
        pytest.skip("a torch_npu is installed")
    q, k_cache, v_cache, step, _ = gqa_case(torch.float16, block_size=128)
    with pytest.raises(ImportError, match="torch_npu"):
        ascend.paged_attention(q, k_cache, v_cache, ascend_meta(step), 0.1)
