"""Plain-torch paged multi-head latent attention (MLA) and DeepSeek sparse attention (DSA) selection.

The MLA cache holds, per token and layer, one row [kv_lora_rank + rope_dim]: the normalized KV latent c and
the roped shared key k_pe. With the key/value up-projections absorbed into the query and the output
(q_c = q_nope @ W_uk, out = o_c @ W_uv^T, done by the model), attention over the latent is multi-query
attention with one shared head: keys are the cached rows, values their first kv_lora_rank columns.

DSA: a light indexer scores every cached key for each query; each query attends only to its index_topk
best keys among those it may see (all of them while its context is shorter than index_topk). The selection
is a per-group boolean mask that replaces the causal mask; layers marked "shared" reuse it.

Batches are split into the same decode / prefill groups as glm_kernels.reference (AttentionMetadata)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_kernels.reference import AttentionMetadata, AttnGroup, gather_kv


def write_rows(cache: torch.Tensor, rows: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the new tokens' rows ([T, dim]) into their slots of a [num_blocks, block_size, dim] cache."""
    cache.view(-1, cache.shape[-1]).index_copy_(0, meta.slot_mapping, rows.to(cache.dtype))


def causal_mask(group: AttnGroup) -> torch.Tensor:
    """[S, 1, max_q or 1, max_kv] bool: the keys each query row may see."""
    return group.mask if group.mask is not None else group.kv_mask


def mla_paged_attention(
    q_latent: torch.Tensor,  # [T, heads, kv_lora_rank]: q_nope absorbed into the latent space
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    meta: AttentionMetadata,
    scale: float,
    selection: list[torch.Tensor] | None = None,  # per group [S, 1, max_q, max_kv]; None: dense causal
) -> torch.Tensor:
    """Attention of the new tokens over their requests' cached latents (the new rows must already be
    written). Returns the attended latent [T, heads, kv_lora_rank]."""
    rank = q_latent.shape[-1]
    q = torch.cat([q_latent, q_pe], dim=-1)
    out = q.new_empty(q.shape[0], q.shape[1], rank)
    for i, group in enumerate(meta.groups):
        qg = q[group.token_index].transpose(1, 2)  # [S, heads, max_q, rank + rope]
        kv = gather_kv(cache, group).to(q.dtype)[:, None]  # [S, 1, max_kv, rank + rope]
        mask = selection[i] if selection is not None else causal_mask(group)
        o = F.scaled_dot_product_attention(
            qg, kv, kv[..., :rank], attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[group.flat_out_index] = o.transpose(1, 2)[group.valid]
    return out


def dsa_select(
    q: torch.Tensor,  # [T, index_heads, index_dim] roped indexer queries
    head_weights: torch.Tensor,  # [T, index_heads] per-token weight of each indexer head
    key_cache: torch.Tensor,  # [num_blocks, block_size, index_dim] (the new keys already written)
    meta: AttentionMetadata,
    index_topk: int,
    scale: float,
) -> list[torch.Tensor]:
    """Per group, the [S, 1, max_q, max_kv] mask of the keys each query attends to: its index_topk best
    keys by sum_h w_h * relu(scale * q_h . k) among the keys it may see."""
    masks = []
    for group in meta.groups:
        keys = gather_kv(key_cache, group).float()  # [S, max_kv, dim]
        qg = q[group.token_index].float()  # [S, max_q, heads, dim]
        scores = F.relu(torch.matmul(qg, keys.transpose(1, 2)[:, None]) * scale)  # [S, max_q, heads, max_kv]
        weights = head_weights[group.token_index].float()  # [S, max_q, heads]
        index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [S, max_q, max_kv]
        allowed = causal_mask(group)[:, 0]
        index_scores = index_scores.masked_fill(~allowed, float("-inf"))
        best = index_scores.topk(min(index_topk, group.max_kv), dim=-1).indices
        chosen = torch.zeros_like(index_scores, dtype=torch.bool).scatter_(-1, best, True)
        masks.append((chosen & allowed)[:, None])
    return masks
