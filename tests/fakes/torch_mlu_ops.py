"""FAKE torch_mlu_ops for CPU tests - NOT Cambricon code. Plain-torch implementations of the documented
semantics of the TMO attention ops glm_kernels/cambricon.py calls (as Cambricon/vllm-mlu vllm_mlu/_mlu_ops.py and
vllm_mlu/attention/backends/flash_attn.py use them), argument constraints checked loudly:
  reshape_paged_cache           the KV write into head-major paged caches (TMO's own reference loop)
  single_query_cached_kv_attn   decode over head-major paged caches [num_blocks, kv_heads, block_size, D]
  flash_attention               packed varlen prefill over the same paged caches (block_tables given)"""

from __future__ import annotations

import torch

from tests.fakes.common import attend, bottom_right_causal, gather_pages, require

calls: list[str] = []


def _pages(cache: torch.Tensor) -> torch.Tensor:
    """Head-major [nb, kv_heads, bs, D] as block-major [nb, bs, kv_heads, D] for gathering."""
    return cache.transpose(1, 2)


def _check_lengths(cu: torch.Tensor, batch: int, name: str) -> None:
    require(
        cu.dtype == torch.int32 and tuple(cu.shape) == (batch + 1,) and int(cu[0]) == 0,
        f"{name}: int32 [B+1]",
    )
    require(bool((cu[1:] >= cu[:-1]).all()), f"{name} must be cumulative")


def reshape_paged_cache(k, v, k_cache, v_cache, slot_mapping):
    calls.append("reshape_paged_cache")
    require(k.dim() == 3 and v.dim() == 3 and k.shape[:2] == v.shape[:2], "k/v [num_tokens, kv_heads, D]")
    require(k_cache.dim() == 4 and k_cache.shape[1] == k.shape[1] and k_cache.shape[3] == k.shape[2],
            "k_cache [num_blocks, kv_heads, block_size, D]")  # fmt: skip
    require(v_cache.shape[:3] == k_cache.shape[:3] and v_cache.shape[3] == v.shape[2], "v_cache like k_cache")
    require(k.dtype == k_cache.dtype and v.dtype == v_cache.dtype, "k/v in the caches' dtype")
    require(slot_mapping.dtype == torch.int32 and tuple(slot_mapping.shape) == (k.shape[0],),
            "slot_mapping int32 [num_tokens]")  # fmt: skip
    block_size = k_cache.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // block_size, :, slot % block_size] = k[t]
            v_cache[slot // block_size, :, slot % block_size] = v[t]


def single_query_cached_kv_attn(
    q, k_cache, v_cache, out, block_tables, context_lens, k_cache_quant_scale, v_cache_quant_scale,
    alibi_slopes, max_context_len, windows_size_left, windows_size_right, softmax_scale, *,
    head_size_v=-1, compute_dtype=torch.float32,
):  # fmt: skip
    calls.append("single_query_cached_kv_attn")
    require(q.dim() == 4 and q.shape[1] == 1 and q.is_contiguous(), "q [B, seq_q=1, heads, D] contiguous")
    batch, _, heads, dim = q.shape
    require(k_cache.dim() == 4 and k_cache.shape[-1] == dim, "k_cache [num_blocks, kv_heads, block_size, D]")
    require(None in (k_cache_quant_scale, v_cache_quant_scale, alibi_slopes) and alibi_slopes is None,
            "fake: no quantized caches, no alibi")  # fmt: skip
    require(windows_size_left < 0 and windows_size_right < 0, "fake: no sliding window (-1, -1)")
    if v_cache is None:
        require(0 < head_size_v <= dim, "v_cache None (MLA) needs head_size_v")
        v_cache = k_cache[..., :head_size_v]
    require(v_cache.shape[:3] == k_cache.shape[:3], "v_cache [num_blocks, kv_heads, block_size, Dv]")
    require(tuple(out.shape) == (batch, 1, heads, v_cache.shape[-1]), "out [B, 1, heads, Dv]")
    require(block_tables.dtype == torch.int32 and block_tables.shape[0] == batch, "block_tables int32 [B, n]")
    require(
        context_lens.dtype == torch.int32 and tuple(context_lens.shape) == (batch,), "context_lens int32 [B]"
    )
    require(int(context_lens.max()) <= max_context_len, "max_context_len below a context length")
    block_size = k_cache.shape[2]
    for b in range(batch):
        length = int(context_lens[b])
        keys = gather_pages(_pages(k_cache), block_tables[b], length, block_size)
        values = gather_pages(_pages(v_cache), block_tables[b], length, block_size)
        allowed = torch.ones(1, length, dtype=torch.bool)
        out[b, 0] = attend(q[b, 0][None], keys, values, softmax_scale, allowed)[0].to(out.dtype)


def flash_attention(
    q, k, v, out, cu_seq_lens_q, cu_seq_lens_kv, alibi_slope, attn_bias, max_seq_len_q, max_seq_len_kv,
    softmax_scale, is_causal, window_size_left=-1, window_size_right=-1, compute_dtype=torch.float,
    return_lse=False, block_tables=None,
):  # fmt: skip
    calls.append("flash_attention")
    require(q.dim() == 3 and q.is_contiguous(), "q [total_q, heads, D] packed, contiguous")
    require(
        block_tables is not None and block_tables.dtype == torch.int32, "fake: paged form only (int32 tables)"
    )
    require(k.dim() == 4 and v.dim() == 4 and k.shape[:3] == v.shape[:3], "k/v [num_blocks, kv_heads, bs, D]")
    require(alibi_slope is None and attn_bias is None and not return_lse, "fake: no alibi, bias or lse")
    require(window_size_left < 0 and window_size_right < 0 and is_causal, "fake: causal, no window")
    batch = block_tables.shape[0]
    _check_lengths(cu_seq_lens_q, batch, "cu_seq_lens_q")
    _check_lengths(cu_seq_lens_kv, batch, "cu_seq_lens_kv")
    require(int(cu_seq_lens_q[-1]) == q.shape[0], "cu_seq_lens_q[-1] must be the packed token count")
    result = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype) if out is None else out
    block_size = k.shape[2]
    for b in range(batch):
        q0, q1 = int(cu_seq_lens_q[b]), int(cu_seq_lens_q[b + 1])
        kv_len = int(cu_seq_lens_kv[b + 1] - cu_seq_lens_kv[b])
        require(q1 - q0 <= max_seq_len_q and kv_len <= max_seq_len_kv, "max_seq_len_q/kv below a length")
        keys = gather_pages(_pages(k), block_tables[b], kv_len, block_size)
        values = gather_pages(_pages(v), block_tables[b], kv_len, block_size)
        result[q0:q1] = attend(q[q0:q1], keys, values, softmax_scale, bottom_right_causal(q1 - q0, kv_len))
    return result
