"""glm_kernels/triton_paged.py and glm_kernels/triton_mla.py against the plain-torch references.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernel modules
are decorated); with one they run compiled on it. fp32 inputs are held to fp32 tolerances; fp16/bf16 outputs
to their dtype's resolution against the fp32 reference over the same (rounded) inputs."""

from __future__ import annotations

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # triton.jit reads this when a function is decorated, and triton.language decorates its own helpers
    # (tl.cdiv, tl.sum, ...) when triton is first imported: it must be set before the first `import triton`.
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not HAS_CUDA and not isinstance(triton.language.standard.cdiv, InterpretedFunction):
    pytest.skip(
        "triton was imported earlier in this process without TRITON_INTERPRET=1 and there is no GPU; "
        "run the tests with TRITON_INTERPRET=1",
        allow_module_level=True,
    )

from glm_kernels import triton_mla, triton_paged  # noqa: E402
from glm_kernels.metadata import build_metadata, build_step_metadata, write_rows  # noqa: E402
from glm_kernels.mla_reference import dsa_topk  # noqa: E402
from glm_kernels.mla_reference import mla_paged_attention as mla_reference  # noqa: E402
from glm_kernels.reference import paged_attention  # noqa: E402

assert triton_paged.INTERPRETED == (not HAS_CUDA)

DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}


def random_batch(seed: int, block_size: int, n_req: int, num_blocks: int = 96, max_start: int = 70):
    """Ragged requests: decode tokens and prefill chunks, with prefixes that often end mid-block."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    starts, q_lens, tables = [], [], []
    for _ in range(n_req):
        start = rng.choice([0, rng.randint(1, max_start)])
        q_len = rng.choice([1, 1, rng.randint(2, 24)])
        tables.append([free.pop() for _ in range((start + q_len + block_size - 1) // block_size)])
        starts.append(start)
        q_lens.append(q_len)
    return starts, q_lens, tables


def triton_metadata(starts, q_lens, tables, block_size) -> triton_paged.TritonMetadata:
    return triton_paged.build_triton_metadata(build_step_metadata(starts, q_lens, tables, block_size, DEVICE))


def write_kv(k_cache, v_cache, k, v, meta) -> None:
    write_rows(k_cache, k, meta.step.slot_mapping)
    write_rows(v_cache, v, meta.step.slot_mapping)


def check(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), **TOL[dtype])


# -- GQA / MHA / MQA ---------------------------------------------------------------------------------
GQA_CASES = [
    # seed, block_size, heads, kv_heads, head_dim, v_dim, dtype
    (0, 16, 4, 2, 32, 32, torch.float32),
    (1, 8, 6, 6, 16, 16, torch.float32),  # MHA, small blocks
    (2, 32, 12, 1, 48, 48, torch.float32),  # MQA, group of 12, head_dim not a power of two
    (3, 16, 8, 2, 40, 24, torch.float32),  # value dim differs from key dim
    (4, 16, 4, 2, 32, 32, torch.float16),
    (5, 32, 4, 1, 64, 64, torch.bfloat16),
]


@pytest.mark.parametrize("seed,block_size,heads,kv_heads,head_dim,v_dim,dtype", GQA_CASES)
def test_gqa_matches_reference(seed, block_size, heads, kv_heads, head_dim, v_dim, dtype):
    torch.manual_seed(seed)
    starts, q_lens, tables = random_batch(seed, block_size, n_req=5)
    k_cache = torch.randn(96, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(96, block_size, kv_heads, v_dim).to(dtype)
    total = sum(q_lens)
    q = torch.randn(total, heads, head_dim).to(dtype)
    meta = build_metadata(starts, q_lens, tables, block_size)
    write_kv(
        k_cache, v_cache, torch.randn(total, kv_heads, head_dim), torch.randn(total, kv_heads, v_dim), meta
    )
    expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, head_dim**-0.5)

    dev_meta = triton_metadata(starts, q_lens, tables, block_size)
    out = triton_paged.paged_attention(
        q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), dev_meta, head_dim**-0.5
    )
    check(out, expected, dtype)


def test_prefix_ending_mid_block_mixed_batch():
    """Decode rows whose context ends mid-block next to chunks that start mid-block, one block table padded."""
    block_size, heads, kv_heads, dim = 16, 4, 2, 32
    starts, q_lens, tables = [21, 5, 37, 0], [1, 1, 9, 3], [[3, 7], [1], [9, 2, 11], [4]]
    torch.manual_seed(7)
    k_cache = torch.randn(12, block_size, kv_heads, dim, device=DEVICE)
    v_cache = torch.randn(12, block_size, kv_heads, dim, device=DEVICE)
    q = torch.randn(sum(q_lens), heads, dim, device=DEVICE)
    meta = triton_metadata(starts, q_lens, tables, block_size)
    expected = paged_attention(q, k_cache, v_cache, meta, 0.3)
    check(triton_paged.paged_attention(q, k_cache, v_cache, meta, 0.3), expected, torch.float32)


@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (2, 16), (5, 32)])
def test_decode_splits_agree(num_splits, block_n):
    """Split-KV partials combine to the same result, including splits left empty for short contexts."""
    block_size, heads, kv_heads, dim = 16, 8, 2, 32
    starts, q_lens, tables = [70, 3, 33], [1, 1, 1], [[0, 1, 2, 3, 4], [5], [6, 7, 8]]
    torch.manual_seed(num_splits)
    k_cache = torch.randn(9, block_size, kv_heads, dim, device=DEVICE)
    v_cache = torch.randn(9, block_size, kv_heads, dim, device=DEVICE)
    q = torch.randn(3, heads, dim, device=DEVICE)
    meta = triton_metadata(starts, q_lens, tables, block_size)
    out = torch.empty_like(q)
    (view,) = meta.views
    triton_paged.paged_decode(q, k_cache, v_cache, out, view, 0.2, num_splits=num_splits, block_n=block_n)
    check(out, paged_attention(q, k_cache, v_cache, meta, 0.2), torch.float32)


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        triton_paged.dot_config(torch.int8)


# -- MLA over the latent cache, dense and DSA top-k -----------------------------------------------------
def naive_mla(q_nope, q_pe, cache, starts, q_lens, tables, scale, topk=None):
    """The docstring semantics of glm_kernels/triton_mla.py, one query token at a time."""
    rank, block_size = q_nope.shape[-1], cache.shape[1]
    out = torch.zeros(q_nope.shape, dtype=torch.float32)
    row = 0
    for start, q_len, table in zip(starts, q_lens, tables, strict=True):
        rows = cache[table].reshape(-1, cache.shape[-1])[: start + q_len].float()
        for i in range(q_len):
            visible = torch.arange(start + i + 1)
            if topk is not None:
                chosen = topk[row][(topk[row] >= 0) & (topk[row] <= start + i)]
                visible = torch.unique(chosen.long())
            if visible.numel():
                keys = rows[visible]
                q = torch.cat([q_nope[row], q_pe[row]], -1).float()
                weights = (scale * q @ keys.T).softmax(-1)
                out[row] = weights @ keys[:, :rank]
            row += 1
    assert block_size > 0
    return out


def mla_case(seed: int, dtype: torch.dtype, rank: int, rope: int, heads: int, block_size: int):
    torch.manual_seed(seed)
    starts, q_lens, tables = random_batch(seed, block_size, n_req=4, num_blocks=64, max_start=40)
    total = sum(q_lens)
    cache = torch.randn(64, block_size, rank + rope).to(dtype)
    meta = build_metadata(starts, q_lens, tables, block_size)
    write_rows(cache, torch.randn(total, rank + rope), meta.step.slot_mapping)
    q_nope = torch.randn(total, heads, rank).to(dtype)
    q_pe = torch.randn(total, heads, rope).to(dtype)
    return starts, q_lens, tables, meta, cache, q_nope, q_pe


@pytest.mark.parametrize(
    "seed,dtype,rank,rope,heads,block_size",
    [
        (0, torch.float32, 32, 16, 5, 16),
        (1, torch.float16, 64, 16, 16, 8),
        (2, torch.bfloat16, 32, 32, 3, 32),
    ],
)
def test_mla_dense_matches_references(seed, dtype, rank, rope, heads, block_size):
    starts, q_lens, tables, meta, cache, q_nope, q_pe = mla_case(seed, dtype, rank, rope, heads, block_size)
    scale = 0.7 * (rank + rope) ** -0.5
    dev_meta = triton_metadata(starts, q_lens, tables, block_size)
    out = triton_mla.mla_paged_attention(
        q_nope.to(DEVICE), q_pe.to(DEVICE), cache.to(DEVICE), dev_meta, scale
    )
    check(out, naive_mla(q_nope, q_pe, cache, starts, q_lens, tables, scale), dtype)
    expected = mla_reference(q_nope.float(), q_pe.float(), cache.float(), meta, scale)
    check(out, expected, dtype)


@pytest.mark.parametrize("seed,dtype,num_splits", [(3, torch.float32, None), (4, torch.float16, 3)])
def test_mla_sparse_topk_matches_references(seed, dtype, num_splits):
    """GLM-5's DSA: top-k rows with -1 padding anywhere, and entries past the query's position ignored."""
    rank, rope, heads, block_size, k = 32, 16, 4, 16, 8
    starts, q_lens, tables, meta, cache, q_nope, q_pe = mla_case(seed, dtype, rank, rope, heads, block_size)
    total, scale = sum(q_lens), (rank + rope) ** -0.5
    indexer_keys = torch.randn(64, block_size, 8)
    selected = dsa_topk(torch.randn(total, 2, 8), torch.randn(total, 2), indexer_keys, meta, k, 0.5)
    topk = torch.cat([selected, torch.full((total, 3), -1, dtype=torch.int32)], dim=1)
    topk[:, -1] = 10_000  # beyond every query's position: never visible
    topk = topk[:, torch.randperm(k + 3)]  # padding and real entries interleaved

    out = torch.empty(total, heads, rank, dtype=dtype, device=DEVICE)
    dev_meta = triton_metadata(starts, q_lens, tables, block_size)
    args = (q_nope.to(DEVICE), q_pe.to(DEVICE), cache.to(DEVICE), out)
    for view in dev_meta.views:
        triton_mla.mla_group(*args, view, scale, topk.to(DEVICE), num_splits=num_splits, block_n=16)
    check(out, naive_mla(q_nope, q_pe, cache, starts, q_lens, tables, scale, topk), dtype)
    check(out, mla_reference(q_nope.float(), q_pe.float(), cache.float(), meta, scale, selected), dtype)
    dense = mla_reference(q_nope.float(), q_pe.float(), cache.float(), meta, scale)
    assert not torch.allclose(out.float().cpu(), dense, atol=1e-2)  # the selection did restrict attention


def test_mla_token_seeing_nothing_gets_zeros():
    rank, rope, block_size = 16, 16, 16
    meta = triton_metadata([5, 0], [1, 1], [[2], [3]], block_size)
    cache = torch.randn(4, block_size, rank + rope, device=DEVICE)
    q_nope, q_pe = torch.randn(2, 2, rank, device=DEVICE), torch.randn(2, 2, rope, device=DEVICE)
    topk = torch.tensor([[-1, -1], [0, -1]], dtype=torch.int32, device=DEVICE)
    out = triton_mla.mla_paged_attention(q_nope, q_pe, cache, meta, 0.25, topk)
    assert torch.equal(out[0].cpu(), torch.zeros(2, rank))
    torch.testing.assert_close(out[1, :, :].cpu(), cache[3, 0, :rank].expand(2, rank).cpu())
