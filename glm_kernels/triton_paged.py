"""Paged attention in Triton for the native engine on CUDA (and on CPU through TRITON_INTERPRET=1, in tests).

Same contract as glm_kernels.reference.paged_attention: the new tokens' K/V are already written; each request's
new tokens sit at flattened rows [first, first + q_len) and attend causally to their request's context.

Layouts (last dim contiguous; the other strides are free):
    q        [T, heads, head_dim]
    k_cache  [num_blocks, block_size, kv_heads, head_dim]
    v_cache  [num_blocks, block_size, kv_heads, v_dim]
    out      [T, heads, v_dim]                           (returned, dtype of q)
GQA: query head h reads kv head h // (heads // kv_heads). Block tables map logical block i of a request to a
physical block; any block_size works (each key's page is looked up on its own).

Per AttnGroup of the metadata (glm_kernels/metadata.py), through its GroupView (TritonMetadata, built once a step):
  - decode (q_len == 1): split-KV flash decoding. One program per (request, kv head, split) computes all
    query heads of the GQA group (padded to 16 rows for tl.dot) against its share of the context, so every
    K/V byte is read once; splits > 1 write fp32 partials (output, log2-sum-exp) that a second kernel
    combines. The number of splits is chosen to fill the GPU (tunable; benchmarks/gpu_kernels.py sweeps it).
  - prefill chunks: one program per (query tile of BLOCK_M rows, request, head) streams the request's keys
    up to the tile's last causal position, masking by position (a prefix may end mid-block).

Precision: fp16/bf16/fp32 inputs. QK^T and PV take the input dtype (tensor cores on the GPU) and accumulate
in fp32; softmax statistics and the output accumulator are fp32; P is rounded to the input dtype before PV,
as flash attention does. fp32 inputs use IEEE fp32 dots (no TF32).
MLA over the latent cache (GLM-4.7-Flash, GLM-5 with DSA top-k) lives in glm_kernels/triton_mla.py and shares
this module's helpers (group views, split combine).
Interpreter caveat (triton 3.9): the interpreter computes bf16 dots and bf16 arithmetic on raw bits, so under
TRITON_INTERPRET=1 bf16 operands are upcast to fp32 before the dots. fp16 and fp32 run the GPU's code path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glm_kernels.metadata import AttentionMetadata, AttnGroup, StepMetadata, group_step

# Whether this module's kernels were decorated for the interpreter (decided at import, as triton.jit does).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
MIN_DOT = 16  # tl.dot needs every dimension >= 16


@dataclass(frozen=True, slots=True)
class GroupView:
    """One AttnGroup as the kernels read it (device tensors, int32), derived once per step."""

    first_token: torch.Tensor  # [S] flattened row of each request's first new token
    q_lens: torch.Tensor  # [S] new tokens per request
    seq_lens: torch.Tensor  # [S] context length including the new tokens
    block_tables: torch.Tensor  # [S, max_blocks]
    max_q: int
    max_kv: int


def group_view(step: StepMetadata, group: AttnGroup) -> GroupView:
    """From the step's host lists: one host-to-device copy per tensor, no reduction on the device."""

    def lengths(values: list[int]) -> torch.Tensor:
        return torch.tensor([values[i] for i in group.requests], dtype=torch.int32, device=step.device)

    return GroupView(
        first_token=lengths(step.query_start_host),
        q_lens=lengths(step.query_lens),
        seq_lens=lengths(step.seq_lens_host),
        block_tables=group.block_tables.to(torch.int32),
        max_q=group.max_q,
        max_kv=group.max_kv,
    )


@dataclass(frozen=True, slots=True)
class TritonMetadata(AttentionMetadata):
    views: list[GroupView]  # one per group, built once per step


def build_triton_metadata(step: StepMetadata) -> TritonMetadata:
    groups = group_step(step)
    return TritonMetadata(step, groups, [group_view(step, g) for g in groups])


def dot_config(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(operand dtype of tl.dot, input_precision) for inputs of `dtype` (see the module docstring)."""
    if dtype == torch.float32:
        return tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return (tl.float32, "ieee") if INTERPRETED else (tl.bfloat16, "tf32")
    if dtype == torch.float16:
        return tl.float16, "tf32"
    raise TypeError(f"triton paged attention supports float16, bfloat16 and float32, not {dtype}")


def pow2(n: int, floor: int = MIN_DOT) -> int:
    return max(floor, triton.next_power_of_2(n))


_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter, to exercise the split path)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def choose_splits(programs: int, max_kv: int, block_n: int, device: torch.device) -> int:
    """Splits of the context so that about four programs per SM fill the device, each split >= 4 tiles."""
    want = math.ceil(4 * sm_count(device) / max(programs, 1))
    return max(1, min(want, math.ceil(max_kv / (4 * block_n)), 32))


@triton.jit
def _online_update(m_i, l_i, acc, s, v, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One flash-attention step: fold scores s ([M, N], log2 domain, -inf = masked) and values v ([N, Dv])."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays empty
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _gqa_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    first_token_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt, num_heads, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok = tl.load(first_token_ptr + seq).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    heads = kvh * GROUP + g
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    q = q.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        block = block.to(tl.int64)
        off = pos % BLOCK_SIZE
        k_rows = k_ptr + block * stride_kb + off * stride_ks + kvh * stride_kh
        k = tl.load(k_rows[:, None] + d[None, :], mask=valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        v_rows = v_ptr + block * stride_vb + off * stride_vs + kvh * stride_vh
        v = tl.load(v_rows[:, None] + dv[None, :], mask=valid[:, None] & (dv[None, :] < V_DIM), other=0.0)
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, v.to(DOT_DTYPE), DOT_DTYPE, PRECISION)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o_mask = (g[:, None] < GROUP) & (dv[None, :] < V_DIM)
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + tok * stride_ot + heads[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        row = (
            seq.to(tl.int64) * num_heads + heads
        ) * NUM_SPLITS + split  # mid_o [rows, heads, splits, BLOCK_DV]
        tl.store(mid_o_ptr + row[:, None] * BLOCK_DV + dv[None, :], acc / l_safe[:, None], mask=o_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def combine_splits_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr, first_token_ptr, q_lens_ptr,
    stride_ot, stride_oh, num_heads,
    MAX_Q: tl.constexpr, V_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """out[token, head] = sum over splits of the partial outputs weighted by exp2(lse - max lse).
    Row r of the partials is query i = r % MAX_Q of request r // MAX_Q (padding rows are skipped)."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    req = row // MAX_Q
    i = row % MAX_Q
    width = tl.where(i < tl.load(q_lens_ptr + req), V_DIM, 0)  # a padding row stores nothing
    tok = (tl.load(first_token_ptr + req) + i).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    base = (row.to(tl.int64) * num_heads + head) * NUM_SPLITS
    lse = tl.load(mid_lse_ptr + base + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)
    o = tl.load(
        mid_o_ptr + (base + sp[:, None]) * BLOCK_DV + dv[None, :], mask=sp[:, None] < NUM_SPLITS, other=0.0
    )
    total = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    o_ptrs = out_ptr + tok * stride_ot + head * stride_oh + dv
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=dv < width)


@triton.jit
def _gqa_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, first_token_ptr, q_lens_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP
    q_len = tl.load(q_lens_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    first = tl.load(first_token_ptr + seq).to(tl.int64)
    context = seq_len - q_len
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = context + rows
    # keys this tile may see: up to its last row's position; none when the tile is all padding
    kv_end = tl.where(tile * BLOCK_M < q_len, tl.minimum(seq_len, context + (tile + 1) * BLOCK_M), 0)

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = q_ptr + (first + rows)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        block = block.to(tl.int64)
        off = pos % BLOCK_SIZE
        k_rows = k_ptr + block * stride_kb + off * stride_ks + kvh * stride_kh
        k = tl.load(k_rows[:, None] + d[None, :], mask=valid[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        v_rows = v_ptr + block * stride_vb + off * stride_vs + kvh * stride_vh
        v = tl.load(v_rows[:, None] + dv[None, :], mask=valid[:, None] & (dv[None, :] < V_DIM), other=0.0)
        m_i, l_i, acc = _online_update(m_i, l_i, acc, s, v.to(DOT_DTYPE), DOT_DTYPE, PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + (first + rows)[:, None] * stride_ot + head * stride_oh + dv[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < V_DIM))


def _check_layouts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} kv heads")


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    view: GroupView,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> None:
    """Decode tokens (q_len == 1) of one group into `out`; launch parameters are tunable for benchmarks."""
    _check_layouts(q, k_cache, v_cache)
    s, heads, head_dim = view.first_token.shape[0], q.shape[1], q.shape[2]
    kv_heads, block_size, v_dim = k_cache.shape[2], k_cache.shape[1], v_cache.shape[-1]
    group = heads // kv_heads
    splits = num_splits or choose_splits(s * kv_heads, view.max_kv, block_n, q.device)
    block_dv = pow2(v_dim)
    mid_o = mid_lse = out  # unused placeholders when there is one split
    if splits > 1:
        mid_o = torch.empty(s, heads, splits, block_dv, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(s, heads, splits, dtype=torch.float32, device=q.device)
    dot_dtype, precision = dot_config(q.dtype)
    _gqa_decode_kernel[(s, kv_heads, splits)](
        q, k_cache, v_cache, out, mid_o, mid_lse, view.first_token, view.seq_lens, view.block_tables,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1), view.block_tables.stride(0), heads, scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_SIZE=block_size, BLOCK_G=pow2(group),
        BLOCK_D=pow2(head_dim), BLOCK_DV=block_dv, BLOCK_N=block_n, NUM_SPLITS=splits,
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        combine_splits(mid_o, mid_lse, out, view, v_dim)


def combine_splits(
    mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor, view: GroupView, v_dim: int
) -> None:
    """Reduce partials mid_o [S * max_q, heads, splits, BLOCK_DV] / mid_lse [S * max_q, heads, splits]."""
    rows, heads, splits = mid_lse.shape
    combine_splits_kernel[(rows, heads)](
        mid_o, mid_lse, out, view.first_token, view.q_lens, out.stride(0), out.stride(1), heads,
        MAX_Q=view.max_q, V_DIM=v_dim, NUM_SPLITS=splits, BLOCK_S=pow2(splits, 2),
        BLOCK_DV=mid_o.shape[-1],
    )  # fmt: skip


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    view: GroupView,
    scale: float,
    *,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> None:
    """Prefill chunks (any q_len, over a paged prefix) of one group into `out`."""
    _check_layouts(q, k_cache, v_cache)
    s, heads, head_dim = view.first_token.shape[0], q.shape[1], q.shape[2]
    kv_heads, block_size, v_dim = k_cache.shape[2], k_cache.shape[1], v_cache.shape[-1]
    block_m = min(block_m, pow2(view.max_q))
    dot_dtype, precision = dot_config(q.dtype)
    grid = (triton.cdiv(view.max_q, block_m), s, heads)
    _gqa_prefill_kernel[grid](
        q, k_cache, v_cache, out, view.first_token, view.q_lens, view.seq_lens, view.block_tables,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        out.stride(0), out.stride(1), view.block_tables.stride(0), scale * LOG2E,
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_D=pow2(head_dim), BLOCK_DV=pow2(v_dim), BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, v_dim]
    meta: TritonMetadata,
    scale: float,
) -> torch.Tensor:
    """Drop-in for glm_kernels.reference.paged_attention. Returns [T, heads, v_dim] in q's dtype."""
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for view in meta.views:
        if view.max_q == 1:
            paged_decode(q, k_cache, v_cache, out, view, scale)
        else:
            paged_prefill(q, k_cache, v_cache, out, view, scale)
    return out
