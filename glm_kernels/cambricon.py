"""Attention on Cambricon MLU (MLU370, MLU590) through torch_mlu_ops (TMO); imported on the first call.

The ops, the layouts and lengths we pass (sources: the TMO wrappers and their use in Cambricon/vllm-mlu
vllm_mlu/_mlu_ops.py and vllm_mlu/attention/backends/flash_attn.py; DeepLink-org/dlinfer
dlinfer/vendor/camb/camb_ops.py):

KV cache layout: TMO's paged caches are HEAD-MAJOR, [num_blocks, kv_heads, block_size, head_dim] (vllm-mlu's
    get_kv_cache_shape is (2, num_blocks, num_kv_heads, block_size, head_size)), not glm_kernels/reference.py's
    [num_blocks, block_size, kv_heads, dim]. An MLU runner allocates that layout (the registry entry says so)
    and writes new tokens with tmo.reshape_paged_cache(k, v, k_cache, v_cache, slot_mapping int32).
    The latent MLA cache has one "head", so [num_blocks, block_size, rank + rope] is the same memory as
    [num_blocks, 1, block_size, rank + rope]: it needs no other layout.
tmo.single_query_cached_kv_attn, decode tokens:
    (q [B, 1, heads, D], k_cache, v_cache, out [B, 1, heads, Dv], block_tables int32 [B, max_blocks],
    context_lens int32 [B] (device; context incl. the new token), k_cache_quant_scale None,
    v_cache_quant_scale None, alibi_slopes None, max_context_len (host int), window_size_left -1,
    window_size_right -1 (no window), softmax_scale); MLA passes v_cache None with head_size_v=rank: the values
    are the first rank columns of the key rows.
tmo.flash_attention, prefill chunks over the paged prefix:
    (q [T, heads, D] packed by request, k_cache, v_cache, out [T, heads, Dv] or None, cu_seq_lens_q int32
    [B + 1] (cumulative new tokens), cu_seq_lens_kv int32 [B + 1] (cumulative context incl. new tokens),
    alibi_slope None, attn_bias None, max_seq_len_q, max_seq_len_kv (host ints), softmax_scale,
    is_causal True (aligned to the end of each request's keys: row i sees keys <= kv_len - q_len + i),
    window_size_left -1, window_size_right -1, compute_dtype torch.float, return_lse False,
    block_tables int32 [B, max_blocks]); returns out. For MLA, value = the key rows (v = k), the output has
    rank + rope columns and the first rank are kept, as vllm-mlu does.
No documented TMO op takes GLM-5's DSA top-k list: that path runs on the plain-torch reference (logged once).
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from glm_kernels.reference import AttentionMetadata, AttnGroup

log = logging.getLogger(__name__)


def _tmo() -> ModuleType:
    import torch_mlu_ops

    return torch_mlu_ops


def _lengths(group: AttnGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_lens, seq_lens) int32 on the device; no host copy (the host maxima come from the shapes)."""
    s = group.token_index.shape[0]
    return group.valid.sum(1, dtype=torch.int32), group.kv_mask.reshape(s, -1).sum(1, dtype=torch.int32)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, kv_heads, block_size, head_dim]  (TMO's head-major layout)
    v_cache: torch.Tensor,  # [num_blocks, kv_heads, block_size, v_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """glm_kernels.reference.paged_attention's semantics on an MLU, over head-major caches. [T, heads, v_dim]."""
    tmo = _tmo()
    v_dim = v_cache.shape[-1]
    out = q.new_empty(q.shape[0], q.shape[1], v_dim)
    for group in meta.groups:
        rows = group.flat_out_index  # request-major: the packed order TMO expects
        q_lens, seq_lens = _lengths(group)
        tables = group.block_tables.to(torch.int32)
        if group.mask is None:
            result = q.new_empty(rows.shape[0], 1, q.shape[1], v_dim)
            tmo.single_query_cached_kv_attn(
                q[rows][:, None].contiguous(), k_cache, v_cache, result, tables, seq_lens,
                None, None, None, group.max_kv, -1, -1, scale,
            )  # fmt: skip
            out[rows] = result[:, 0]
        else:
            out[rows] = tmo.flash_attention(
                q[rows].contiguous(), k_cache, v_cache, None, _cumulative(q_lens), _cumulative(seq_lens),
                None, None, group.token_index.shape[1], group.max_kv, scale, True, -1, -1,
                torch.float, False, tables,
            )  # fmt: skip
    return out


_warned: set[str] = set()


def mla_paged_attention(
    q_nope: torch.Tensor,  # [T, heads, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    latent_cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    meta: AttentionMetadata,
    scale: float,
    topk_indices: torch.Tensor | None = None,  # [T, k] key positions, -1 = padding
) -> torch.Tensor:
    """glm_kernels.triton_mla's semantics on an MLU. Returns [T, heads, kv_lora_rank]."""
    if topk_indices is not None:
        from glm_kernels.dsa_topk import reference_mla_attention

        if "sparse" not in _warned:
            _warned.add("sparse")
            log.warning("torch_mlu_ops has no DSA top-k attention op: it runs on the torch reference")
        return reference_mla_attention(q_nope, q_pe, latent_cache, meta, scale, topk_indices)
    tmo = _tmo()
    rank = q_nope.shape[-1]
    num_blocks, block_size, row = latent_cache.shape
    cache = latent_cache.view(num_blocks, 1, block_size, row)  # one latent "head": same memory
    q = torch.cat([q_nope, q_pe], dim=-1)
    out = q_nope.new_empty(q_nope.shape)
    for group in meta.groups:
        rows = group.flat_out_index
        q_lens, seq_lens = _lengths(group)
        tables = group.block_tables.to(torch.int32)
        if group.mask is None:
            result = q.new_empty(rows.shape[0], 1, q.shape[1], rank)
            tmo.single_query_cached_kv_attn(
                q[rows][:, None].contiguous(), cache, None, result, tables, seq_lens,
                None, None, None, group.max_kv, -1, -1, scale, head_size_v=rank,
            )  # fmt: skip
            out[rows] = result[:, 0]
        else:
            result = tmo.flash_attention(
                q[rows].contiguous(), cache, cache, None, _cumulative(q_lens), _cumulative(seq_lens),
                None, None, group.token_index.shape[1], group.max_kv, scale, True, -1, -1,
                torch.float, False, tables,
            )  # fmt: skip
            out[rows] = result[..., :rank]
    return out
