"""Plain-torch paged attention: the correctness oracle, and the backend every device can run.

Each group of the step (glm_kernels/metadata.py) gathers its KV blocks into a padded [S, L, kv_heads, dim]
tensor and runs one SDPA call; MLA and DSA's top-k are glm_kernels/mla_reference.py's."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from glm_kernels import mla_reference
from glm_kernels.backend import AttentionBackend, GqaCache, MlaCache
from glm_kernels.metadata import AttentionMetadata, StepMetadata, gather_kv, group_step


def paged_attention(
    q: torch.Tensor,  # [T, heads, dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the new tokens over their requests' cached context (the new tokens' KV must already be
    written). Returns [T, heads, v_dim]."""
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for group in meta.groups:
        s, max_q = group.token_index.shape
        qg = q.index_select(0, group.token_index.reshape(-1)).view(s, max_q, *q.shape[1:]).transpose(1, 2)
        kg = gather_kv(k_cache, group).transpose(1, 2).to(q.dtype)  # [S, kv_heads, max_kv, dim]
        vg = gather_kv(v_cache, group).transpose(1, 2).to(q.dtype)
        mask = group.mask if group.mask is not None else group.kv_mask
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=qg.shape[1] != kg.shape[1]
        ).transpose(1, 2)  # [S, max_q, heads, v_dim]
        rows = o.reshape(s, *o.shape[2:]) if max_q == 1 else o[group.valid]
        out.index_copy_(0, group.flat_out_index, rows)
    return out


def naive_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """Dense causal attention of one request's q_len new tokens (positions start..) over its full context
    keys/values ([L, kv_heads, dim]); used by tests as the simplest possible statement of the semantics."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    rep = heads // kv_heads
    k = keys.repeat_interleave(rep, dim=1)
    v = values.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    q_pos = torch.arange(start, start + q.shape[0])[:, None]
    allowed = torch.arange(keys.shape[0])[None, :] <= q_pos
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)


class ReferenceBackend(AttentionBackend[AttentionMetadata]):
    """Block-major GQA caches, joint MLA rows; gather + SDPA per group."""

    name: ClassVar[str] = "reference"

    def build_metadata(self, step: StepMetadata) -> AttentionMetadata:
        return AttentionMetadata(step, group_step(step))

    def gqa_attention(self, q, cache: GqaCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, cache.key, cache.value, meta, scale)

    def mla_attention(self, q_latent, q_pe, cache: MlaCache, meta, scale, topk_indices) -> torch.Tensor:
        return mla_reference.mla_paged_attention(q_latent, q_pe, cache.rows, meta, scale, topk_indices)
