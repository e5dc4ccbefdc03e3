"""GLM-5 (model_type glm_moe_dsa): MLA (mla.py) with DeepSeek sparse attention, MoE (moe.py).

Each "full" layer has an indexer: per query, a score for every key it may see, from light projections of
its own (wq_b on the query LoRA, wk + LayerNorm on the hidden state, a weight per indexer head); the query
then attends only to its index_topk best keys. "shared" layers (config.indexer_types) reuse the selection
of the last full layer before them. The selection is a [T, index_topk] index tensor that stays on the device
(the attention backend's dsa_topk); a full layer's cache holds its indexer keys beside the latent rows.

Under tensor parallelism the indexer is replicated (every rank computes the same selection and keeps all
indexer keys, like the latent: see mla.py); the attention heads are split.

The MTP layer (num_nextn_predict_layers, stored as layer num_hidden_layers) loads only for speculative
decoding with method mtp (moe.py, mtp.py); it has an indexer of its own."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from backends.models.mla import MlaAttention, MlaCausalLM, MlaRope
from backends.models.moe import Fp32Linear, StepState
from backends.parallel import Linear
from glm_kernels.backend import AttentionContext, LayerSpec, MlaCache


class DsaIndexer(nn.Module):
    def __init__(self, config, rope: MlaRope):
        super().__init__()
        self.num_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.index_topk = config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.wk = Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Fp32Linear(config.hidden_size, self.num_heads)
        self.rope = rope
        self.scale = self.head_dim**-0.5

    def forward(self, x, q_resid, positions, cache: MlaCache, attn: AttentionContext) -> torch.Tensor:
        """Write the new tokens' indexer keys; return each query's selected keys [T, index_topk]."""
        q = self.wq_b(q_resid).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(self.wk(x))[:, None, :]
        q, k = self.rotate_front(positions, q), self.rotate_front(positions, k)[:, 0]
        weights = self.weights_proj(x) * self.num_heads**-0.5
        return attn.dsa_topk(q, weights, k, cache, self.index_topk, self.scale)

    def rotate_front(self, positions, x: torch.Tensor) -> torch.Tensor:
        """The indexer ropes the first qk_rope_head_dim dims of each head (MLA ropes the last ones)."""
        rot, rest = x.split([self.rope_dim, x.shape[-1] - self.rope_dim], dim=-1)
        return torch.cat([self.rope(positions, rot), rest], dim=-1)


class DsaAttention(MlaAttention):
    def __init__(self, config, rope: MlaRope, full: bool):
        super().__init__(config, rope)
        self.indexer = DsaIndexer(config, rope) if full else None

    def forward(
        self, x, positions, kv_cache: MlaCache, attn: AttentionContext, step: StepState
    ) -> torch.Tensor:
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.queries(x, q_resid, positions)
        if self.indexer is not None:
            step.topk_indices = self.indexer(x, q_resid, positions, kv_cache, attn)
        elif step.topk_indices is None:
            raise ValueError("a 'shared' DSA layer needs a 'full' indexer layer before it")
        return self.attend(q_nope, q_pe, *self.latent(x, positions), kv_cache, attn, step.topk_indices)


class GlmMoeDsaForCausalLM(MlaCausalLM):
    def __init__(self, config):
        kinds = getattr(config, "indexer_types", None) or ["full"] * config.num_hidden_layers
        full = [kind != "shared" for kind in kinds] + [True]  # the MTP layer selects its own keys
        rope = MlaRope(config, config.qk_rope_head_dim, interleaved=True)
        super().__init__(config, lambda layer: DsaAttention(config, rope, full[layer]))
        self.full_indexer = full
        self.index_dim = config.index_head_dim

    def kv_cache_specs(self) -> list[LayerSpec]:
        """Full-indexer layers keep their indexer keys beside the latent; shared layers only the latent."""
        with_keys = replace(self.latent_spec, index_dim=self.index_dim)
        return [with_keys if full else self.latent_spec for full in self.full_indexer[: self.num_kv_layers]]
