"""Multi-head latent attention (MLA) in Triton over the latent paged cache, dense causal or DSA top-k sparse.

Semantics (the same as glm_kernels.mla_reference.mla_paged_attention):
    latent_cache   [num_blocks, block_size, kv_lora_rank + rope_dim]   row = [c (normalized KV latent) | k_pe]
    q_nope         [T, heads, kv_lora_rank]   q_nope already absorbed into the latent space (q_nope @ W_uk)
    q_pe           [T, heads, rope_dim]       roped query part
    topk_indices   [T, k] int, optional       per query token, the key positions (0-based positions in its
                                              request's sequence) it may attend to; -1 entries are padding
                                              and may sit anywhere in the row
    out            [T, heads, kv_lora_rank]   (returned, q's dtype) the attended latent; the model applies W_uv
For query token t of a request (position p = context + i), key j is visible when j <= p and, with
topk_indices, j is one of topk_indices[t]. score(t, h, j) = scale * (q_nope[t,h] . c_j + q_pe[t,h] . k_pe_j),
out[t, h] = softmax over visible j of the scores, applied to c_j. A token that sees no key gets zeros.

Design: keys and values are the same latent rows, shared by every head (multi-query attention with one KV
head), so one program loads a tile of latent rows once for BLOCK_H query heads of one token. One program per
(query row, head block, split): decode rows are one per request; a prefill chunk's rows are its tokens, each
streaming its own causal prefix (latent-space prefill is bandwidth-bound per token; long prompts are better
served by the expanded form, kv_b_proj applied and run through the GQA prefill kernel). Sparse rows read only
their k selected rows (a gather through the block table), never the whole context. Splits > 1 write fp32
partials combined by glm_kernels.triton_paged.combine_splits_kernel. Precision as in glm_kernels/triton_paged.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_kernels.triton_paged import (
    LOG2E,
    GroupView,
    TritonMetadata,
    _online_update,
    choose_splits,
    combine_splits,
    dot_config,
    pow2,
)


@triton.jit
def _mla_kernel(
    q_nope_ptr, q_pe_ptr, cache_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    first_token_ptr, q_lens_ptr, seq_lens_ptr, block_tables_ptr, topk_ptr,
    stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_cb, stride_cs, stride_ot, stride_oh,
    stride_bt, stride_tk, num_heads, topk, scale_log2,
    MAX_Q: tl.constexpr, HEAD_BLOCKS: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPARSE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # program_id(0) = row * HEAD_BLOCKS + head block: a row's head blocks run together and share its keys in L2
    row = tl.program_id(0) // HEAD_BLOCKS
    head_block = tl.program_id(0) % HEAD_BLOCKS
    split = tl.program_id(1)
    req = row // MAX_Q
    i = row % MAX_Q
    q_len = tl.load(q_lens_ptr + req)
    pos = tl.load(seq_lens_ptr + req) - q_len + i  # this query's position; it sees keys 0..pos
    tok = (tl.load(first_token_ptr + req) + tl.minimum(i, q_len - 1)).to(tl.int64)  # padding reads a real row
    if SPARSE:
        n_keys = topk
    else:
        n_keys = pos + 1
    n_keys = tl.where(i < q_len, n_keys, 0)  # padding rows of a prefill group do nothing
    split_len = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, n_keys)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    r = tl.arange(0, BLOCK_R)
    p = tl.arange(0, BLOCK_P)
    qn_ptrs = q_nope_ptr + tok * stride_qnt + heads[:, None] * stride_qnh + r[None, :]
    q_nope = tl.load(qn_ptrs, mask=h_ok[:, None] & (r[None, :] < RANK), other=0.0).to(DOT_DTYPE)
    qp_ptrs = q_pe_ptr + tok * stride_qpt + heads[:, None] * stride_qph + p[None, :]
    q_pe = tl.load(qp_ptrs, mask=h_ok[:, None] & (p[None, :] < ROPE), other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        in_range = j < end
        if SPARSE:
            key = tl.load(topk_ptr + tok * stride_tk + j, mask=in_range, other=-1)
            valid = in_range & (key >= 0) & (key <= pos)
        else:
            key = j
            valid = in_range
        key = tl.where(valid, key, 0)
        block = tl.load(block_tables_ptr + req * stride_bt + key // BLOCK_SIZE, mask=valid, other=0)
        rows = cache_ptr + block.to(tl.int64) * stride_cb + (key % BLOCK_SIZE) * stride_cs
        c = tl.load(rows[:, None] + r[None, :], mask=valid[:, None] & (r[None, :] < RANK), other=0.0)
        c = c.to(DOT_DTYPE)
        k_pe = tl.load(
            rows[:, None] + RANK + p[None, :], mask=valid[:, None] & (p[None, :] < ROPE), other=0.0
        )
        s = tl.dot(q_nope, tl.trans(c), input_precision=PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe.to(DOT_DTYPE)), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, c, DOT_DTYPE, PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o_mask = h_ok[:, None] & (r[None, :] < tl.where(i < q_len, RANK, 0))
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + tok * stride_ot + heads[:, None] * stride_oh + r[None, :]
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        mid = (
            row.to(tl.int64) * num_heads + heads
        ) * NUM_SPLITS + split  # mid_o [rows, heads, splits, BLOCK_R]
        tl.store(mid_o_ptr + mid[:, None] * BLOCK_R + r[None, :], acc / l_safe[:, None], mask=h_ok[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(mid_lse_ptr + mid, lse, mask=h_ok)


def mla_group(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    latent_cache: torch.Tensor,
    out: torch.Tensor,
    view: GroupView,
    scale: float,
    topk_indices: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    block_h: int = 16,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
) -> None:
    """MLA for the rows of one group into `out`; launch parameters are tunable for benchmarks."""
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("latent_cache", latent_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")
    rank, rope = q_nope.shape[-1], q_pe.shape[-1]
    if latent_cache.shape[-1] != rank + rope:
        raise ValueError(f"latent rows have {latent_cache.shape[-1]} dims, expected {rank} + {rope}")
    heads, block_size = q_nope.shape[1], latent_cache.shape[1]
    rows = view.first_token.shape[0] * view.max_q
    sparse = topk_indices is not None
    topk = topk_indices.shape[1] if sparse else 0
    keys = topk if sparse else view.max_kv
    head_blocks = triton.cdiv(heads, block_h)
    splits = num_splits or choose_splits(rows * head_blocks, keys, block_n, q_nope.device)
    block_r = pow2(rank)
    mid_o = mid_lse = out
    if splits > 1:
        mid_o = torch.empty(rows, heads, splits, block_r, dtype=torch.float32, device=out.device)
        mid_lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=out.device)
    index = topk_indices if sparse else view.seq_lens  # placeholder pointer when dense
    dot_dtype, precision = dot_config(q_nope.dtype)
    _mla_kernel[(rows * head_blocks, splits)](
        q_nope, q_pe, latent_cache, out, mid_o, mid_lse,
        view.first_token, view.q_lens, view.seq_lens, view.block_tables, index,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        latent_cache.stride(0), latent_cache.stride(1), out.stride(0), out.stride(1),
        view.block_tables.stride(0), index.stride(0), heads, topk, scale * LOG2E,
        MAX_Q=view.max_q, HEAD_BLOCKS=head_blocks, RANK=rank, ROPE=rope, BLOCK_SIZE=block_size, BLOCK_H=block_h,
        BLOCK_R=block_r, BLOCK_P=pow2(rope), BLOCK_N=block_n, NUM_SPLITS=splits, SPARSE=sparse,
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        combine_splits(mid_o, mid_lse, out, view, rank)


def mla_paged_attention(
    q_nope: torch.Tensor,  # [T, heads, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    latent_cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    meta: TritonMetadata,
    scale: float,
    topk_indices: torch.Tensor | None = None,  # [T, k] key positions, -1 = padding
) -> torch.Tensor:
    """Attention of the new tokens over their requests' cached latents (new rows already written).
    Returns [T, heads, kv_lora_rank] in q_nope's dtype."""
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], q_nope.shape[2])
    for view in meta.views:
        mla_group(q_nope, q_pe, latent_cache, out, view, scale, topk_indices)
    return out
