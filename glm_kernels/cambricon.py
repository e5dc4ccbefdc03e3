"""Attention on Cambricon MLU (MLU370, MLU590) through torch_mlu_ops (TMO); imported on the first call.

The ops, the layouts and lengths we pass (sources: the TMO wrappers and their use in Cambricon/vllm-mlu
vllm_mlu/_mlu_ops.py and vllm_mlu/attention/backends/flash_attn.py; DeepLink-org/dlinfer
dlinfer/vendor/camb/camb_ops.py):

KV cache layout: TMO's paged caches are HEAD-MAJOR, [num_blocks, kv_heads, block_size, head_dim] (vllm-mlu's
    get_kv_cache_shape is (2, num_blocks, num_kv_heads, block_size, head_size)), not glm_kernels/reference.py's
    [num_blocks, block_size, kv_heads, dim]. CambriconBackend allocates that layout (KvLayout.HEAD_MAJOR)
    and writes new tokens with tmo.reshape_paged_cache(k [T, kv_heads, D], v, k_cache, v_cache,
    slot_mapping int32 [T]) (TMO's reference: k_cache[slot // block_size, :, slot % block_size] = k[t]).
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
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from glm_kernels import mla_reference
from glm_kernels.backend import AttentionBackend, GqaCache, KvLayout, MlaCache
from glm_kernels.metadata import AttentionMetadata, StepMetadata, group_step

log = logging.getLogger(__name__)


def _tmo() -> ModuleType:
    import torch_mlu_ops

    return torch_mlu_ops


@dataclass(frozen=True, slots=True)
class GroupLengths:
    """A group's lengths on the device as TMO takes them (the host maxima come from the group's shapes)."""

    seq_lens: torch.Tensor  # [S] int32: context incl. the new tokens
    cu_q_lens: torch.Tensor  # [S + 1] int32
    cu_seq_lens: torch.Tensor  # [S + 1] int32
    block_tables: torch.Tensor  # [S, max_blocks] int32


@dataclass(frozen=True, slots=True)
class CambriconMetadata(AttentionMetadata):
    lengths: list[GroupLengths]  # one per group
    slot_mapping: torch.Tensor  # [T] int32 for reshape_paged_cache


def build_cambricon_metadata(step: StepMetadata) -> CambriconMetadata:
    groups = group_step(step)
    lengths = []
    for group in groups:
        q_lens = [step.query_lens[i] for i in group.requests]
        seq_lens = [step.seq_lens_host[i] for i in group.requests]
        lengths.append(
            GroupLengths(
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=step.device),
                cu_q_lens=torch.tensor(_cumulative(q_lens), dtype=torch.int32, device=step.device),
                cu_seq_lens=torch.tensor(_cumulative(seq_lens), dtype=torch.int32, device=step.device),
                block_tables=group.block_tables.to(torch.int32),
            )
        )
    return CambriconMetadata(step, groups, lengths, step.slot_mapping.to(torch.int32))


def _cumulative(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def write_kv(k_cache, v_cache, k: torch.Tensor, v: torch.Tensor, meta: CambriconMetadata) -> None:
    """The new tokens' K/V ([T, kv_heads, dim]) into head-major caches."""
    _tmo().reshape_paged_cache(k.to(k_cache.dtype), v.to(v_cache.dtype), k_cache, v_cache, meta.slot_mapping)


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, kv_heads, block_size, head_dim]  (TMO's head-major layout)
    v_cache: torch.Tensor,  # [num_blocks, kv_heads, block_size, v_dim]
    meta: CambriconMetadata,
    scale: float,
) -> torch.Tensor:
    """glm_kernels.reference.paged_attention's semantics on an MLU, over head-major caches. [T, heads, v_dim]."""
    tmo = _tmo()
    v_dim = v_cache.shape[-1]
    out = q.new_empty(q.shape[0], q.shape[1], v_dim)
    for group, lens in zip(meta.groups, meta.lengths, strict=True):
        rows = group.flat_out_index  # request-major: the packed order TMO expects
        if group.is_decode:
            result = q.new_empty(rows.shape[0], 1, q.shape[1], v_dim)
            tmo.single_query_cached_kv_attn(
                q[rows][:, None].contiguous(), k_cache, v_cache, result, lens.block_tables, lens.seq_lens,
                None, None, None, group.max_kv, -1, -1, scale,
            )  # fmt: skip
            out[rows] = result[:, 0]
        else:
            out[rows] = tmo.flash_attention(
                q[rows].contiguous(), k_cache, v_cache, None, lens.cu_q_lens, lens.cu_seq_lens,
                None, None, group.max_q, group.max_kv, scale, True, -1, -1,
                torch.float, False, lens.block_tables,
            )  # fmt: skip
    return out


_warned: set[str] = set()


def mla_paged_attention(
    q_nope: torch.Tensor,  # [T, heads, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    latent_cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    meta: CambriconMetadata,
    scale: float,
    topk_indices: torch.Tensor | None = None,  # [T, k] key positions, -1 = padding
) -> torch.Tensor:
    """glm_kernels.triton_mla's semantics on an MLU. Returns [T, heads, kv_lora_rank]."""
    if topk_indices is not None:
        if "sparse" not in _warned:
            _warned.add("sparse")
            log.warning("torch_mlu_ops has no DSA top-k attention op: it runs on the torch reference")
        return mla_reference.mla_paged_attention(q_nope, q_pe, latent_cache, meta, scale, topk_indices)
    tmo = _tmo()
    rank = q_nope.shape[-1]
    num_blocks, block_size, row = latent_cache.shape
    cache = latent_cache.view(num_blocks, 1, block_size, row)  # one latent "head": same memory
    q = torch.cat([q_nope, q_pe], dim=-1)
    out = q_nope.new_empty(q_nope.shape)
    for group, lens in zip(meta.groups, meta.lengths, strict=True):
        rows = group.flat_out_index
        if group.is_decode:
            result = q.new_empty(rows.shape[0], 1, q.shape[1], rank)
            tmo.single_query_cached_kv_attn(
                q[rows][:, None].contiguous(), cache, None, result, lens.block_tables, lens.seq_lens,
                None, None, None, group.max_kv, -1, -1, scale, head_size_v=rank,
            )  # fmt: skip
            out[rows] = result[:, 0]
        else:
            result = tmo.flash_attention(
                q[rows].contiguous(), cache, cache, None, lens.cu_q_lens, lens.cu_seq_lens,
                None, None, group.max_q, group.max_kv, scale, True, -1, -1,
                torch.float, False, lens.block_tables,
            )  # fmt: skip
            out[rows] = result[..., :rank]
    return out


class CambriconBackend(AttentionBackend[CambriconMetadata]):
    """Head-major GQA caches, written by TMO's reshape_paged_cache; MLA's joint rows (one latent head, the same
    memory either way)."""

    name: ClassVar[str] = "cambricon"
    kv_layout: ClassVar[KvLayout] = KvLayout.HEAD_MAJOR

    def build_metadata(self, step: StepMetadata) -> CambriconMetadata:
        return build_cambricon_metadata(step)

    def write_kv(self, cache: GqaCache, k, v, meta: CambriconMetadata) -> None:
        write_kv(cache.key, cache.value, k, v, meta)

    def gqa_attention(self, q, cache: GqaCache, meta: CambriconMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, cache.key, cache.value, meta, scale)

    def mla_attention(self, q_latent, q_pe, cache: MlaCache, meta, scale, topk_indices) -> torch.Tensor:
        return mla_paged_attention(q_latent, q_pe, cache.rows, meta, scale, topk_indices)
