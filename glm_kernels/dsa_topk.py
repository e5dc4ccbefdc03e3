"""GLM-5's DSA selection in its two forms, and the reference MLA behind the kernels' common signature.

glm_kernels.mla_reference describes the keys each query attends to as per-group masks ([S, 1, max_q, max_kv]
bool, AttentionMetadata's groups); the fused kernels (Triton, torch_npu's sparse flash attention) take per-token
index lists: topk_indices [T, k] of key positions within the token's request, -1 = padding (anywhere in a
row). Both are causal: an index past the query's own position is never attended. Plain torch, no vendor
imports, so the vendor wrappers can fall back on it."""

from __future__ import annotations

import torch

from glm_kernels import mla_reference
from glm_kernels.reference import AttentionMetadata


def selection_to_topk(selection: list[torch.Tensor], meta: AttentionMetadata, k: int) -> torch.Tensor:
    """Per-group selection masks as index lists [T, k] (ascending positions first, then -1 padding)."""
    out = torch.full((meta.num_tokens, k), -1, dtype=torch.int32, device=meta.slot_mapping.device)
    for group, mask in zip(meta.groups, selection, strict=True):
        rows = mask[:, 0][group.valid]  # [n_valid, max_kv]
        positions = torch.arange(rows.shape[-1], device=rows.device, dtype=torch.int32)
        chosen = torch.where(rows, positions, torch.iinfo(torch.int32).max).sort(dim=-1).values[:, :k]
        chosen = torch.where(chosen == torch.iinfo(torch.int32).max, -1, chosen)
        out[group.flat_out_index, : chosen.shape[1]] = chosen
    return out


def topk_to_selection(topk_indices: torch.Tensor, meta: AttentionMetadata) -> list[torch.Tensor]:
    """Index lists [T, k] as per-group selection masks [S, 1, max_q, max_kv] (causal applied)."""
    masks = []
    for group in meta.groups:
        idx = topk_indices[group.token_index].long()  # [S, max_q, k]
        valid = (idx >= 0) & (idx < group.max_kv)
        hits = torch.zeros(*idx.shape[:2], group.max_kv, dtype=torch.int32, device=idx.device)
        hits.scatter_add_(-1, idx.clamp(0, group.max_kv - 1), valid.to(torch.int32))
        masks.append(((hits > 0) & mla_reference.causal_mask(group)[:, 0])[:, None])
    return masks


def reference_mla_attention(
    q_nope: torch.Tensor,  # [T, heads, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    latent_cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    meta: AttentionMetadata,
    scale: float,
    topk_indices: torch.Tensor | None = None,  # [T, k], -1 = padding
) -> torch.Tensor:
    """glm_kernels.mla_reference.mla_paged_attention with the selection given as index lists."""
    selection = topk_to_selection(topk_indices, meta) if topk_indices is not None else None
    return mla_reference.mla_paged_attention(q_nope, q_pe, latent_cache, meta, scale, selection)
