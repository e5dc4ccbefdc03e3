"""Plain-torch paged multi-head latent attention (MLA) and DeepSeek sparse attention (DSA) top-k selection.

The MLA cache holds, per token and layer, one row [kv_lora_rank + rope_dim]: the normalized KV latent c and
the roped shared key k_pe. With the key/value up-projections absorbed into the query and the output
(q_c = q_nope @ W_uk, out = o_c @ W_uv^T, done by the model), attention over the latent is multi-query
attention with one shared head: keys are the cached rows, values their first kv_lora_rank columns.

DSA: a light indexer scores every cached key for each query; each query attends only to its index_topk
best keys among those it may see (all of them while its context is shorter than index_topk). The selection
is an index tensor [T, k] of key positions within the token's request, -1 = padding (anywhere in a row), as
the fused kernels (Triton, torch_npu's sparse flash attention) take it; it stays on the device. Layers
marked "shared" reuse the last full layer's. Batches are split into glm_kernels.metadata's groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_kernels.metadata import AttentionMetadata, AttnGroup, causal_mask, gather_kv


def topk_mask(topk_indices: torch.Tensor, group: AttnGroup) -> torch.Tensor:
    """A group's rows of index lists [T, k] as the [S, 1, max_q, max_kv] mask of selected visible keys."""
    idx = topk_indices[group.token_index].long()  # [S, max_q, k]
    valid = (idx >= 0) & (idx < group.max_kv)
    hits = torch.zeros(*idx.shape[:2], group.max_kv, dtype=torch.int32, device=idx.device)
    hits.scatter_add_(-1, idx.clamp(0, group.max_kv - 1), valid.to(torch.int32))
    return ((hits > 0) & causal_mask(group)[:, 0])[:, None]


def mla_paged_attention(
    q_latent: torch.Tensor,  # [T, heads, kv_lora_rank]: q_nope absorbed into the latent space
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    cache: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank + rope_dim]
    meta: AttentionMetadata,
    scale: float,
    topk_indices: torch.Tensor | None = None,  # [T, k] key positions, -1 = padding; None: dense causal
) -> torch.Tensor:
    """Attention of the new tokens over their requests' cached latents (the new rows must already be
    written). Returns the attended latent [T, heads, kv_lora_rank]."""
    rank = q_latent.shape[-1]
    q = torch.cat([q_latent, q_pe], dim=-1)
    out = q.new_empty(q.shape[0], q.shape[1], rank)
    for group in meta.groups:
        qg = q[group.token_index].transpose(1, 2)  # [S, heads, max_q, rank + rope]
        kv = gather_kv(cache, group).to(q.dtype)[:, None]  # [S, 1, max_kv, rank + rope]
        mask = topk_mask(topk_indices, group) if topk_indices is not None else causal_mask(group)
        o = F.scaled_dot_product_attention(
            qg, kv, kv[..., :rank], attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[group.flat_out_index] = o.transpose(1, 2)[group.valid]
    return out


def dsa_topk(
    q: torch.Tensor,  # [T, index_heads, index_dim] roped indexer queries
    head_weights: torch.Tensor,  # [T, index_heads] per-token weight of each indexer head
    key_cache: torch.Tensor,  # [num_blocks, block_size, index_dim] (the new keys already written)
    meta: AttentionMetadata,
    index_topk: int,
    scale: float,
) -> torch.Tensor:
    """Each query's index_topk best keys by sum_h w_h * relu(scale * q_h . k) among the keys it may see, as
    [T, index_topk] int32 positions (-1 where it sees fewer). No device-to-host copy."""
    out = torch.full((q.shape[0], index_topk), -1, dtype=torch.int32, device=q.device)
    for group in meta.groups:
        keys = gather_kv(key_cache, group).float()  # [S, max_kv, dim]
        qg = q[group.token_index].float()  # [S, max_q, heads, dim]
        scores = F.relu(torch.matmul(qg, keys.transpose(1, 2)[:, None]) * scale)  # [S, max_q, heads, max_kv]
        weights = head_weights[group.token_index].float()  # [S, max_q, heads]
        index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [S, max_q, max_kv]
        index_scores = index_scores.masked_fill(~causal_mask(group)[:, 0], float("-inf"))
        best = index_scores.topk(min(index_topk, group.max_kv), dim=-1)
        chosen = torch.where(best.values == float("-inf"), -1, best.indices).to(torch.int32)
        out[group.flat_out_index, : chosen.shape[-1]] = chosen.flatten(0, 1).index_select(0, group.valid_rows)
    return out
