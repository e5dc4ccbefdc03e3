"""GLM-5 (model_type glm_moe_dsa): MLA (mla.py) with DeepSeek sparse attention, MoE (moe.py).

Each "full" layer has an indexer: per query, a score for every key it may see, from light projections of
its own (wq_b on the query LoRA, wk + LayerNorm on the hidden state, a weight per indexer head); the query
then attends only to its index_topk best keys. "shared" layers (config.indexer_types) reuse the selection
of the last full layer before them. The cache of a layer is (latent rows, indexer keys or None).

Under tensor parallelism the indexer is replicated (every rank computes the same selection and keeps all
indexer keys, like the latent: see mla.py); the attention heads are split.

The MTP layer (num_nextn_predict_layers, stored as layer num_hidden_layers) loads only for speculative
decoding with method mtp (moe.py, mtp.py); it has an indexer of its own."""

from __future__ import annotations

import torch
from torch import nn

from backends.models.mla import MlaAttention, MlaCausalLM, MlaRope
from backends.models.moe import Fp32Linear, StepState
from backends.parallel import Linear
from glm_kernels.mla_reference import dsa_select, write_rows
from glm_kernels.reference import AttentionMetadata


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

    def forward(self, x, q_resid, positions, key_cache, meta: AttentionMetadata) -> list[torch.Tensor]:
        """Write the new tokens' indexer keys; return each group's selection mask (dsa_select)."""
        q = self.wq_b(q_resid).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(self.wk(x))[:, None, :]
        q, k = self.rotate_front(positions, q), self.rotate_front(positions, k)[:, 0]
        write_rows(key_cache, k, meta)
        weights = self.weights_proj(x) * self.num_heads**-0.5
        return dsa_select(q, weights, key_cache, meta, self.index_topk, self.scale)

    def rotate_front(self, positions, x: torch.Tensor) -> torch.Tensor:
        """The indexer ropes the first qk_rope_head_dim dims of each head (MLA ropes the last ones)."""
        rot, rest = x.split([self.rope_dim, x.shape[-1] - self.rope_dim], dim=-1)
        return torch.cat([self.rope(positions, rot), rest], dim=-1)


class DsaAttention(MlaAttention):
    def __init__(self, config, rope: MlaRope, full: bool):
        super().__init__(config, rope)
        self.indexer = DsaIndexer(config, rope) if full else None

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata, step: StepState) -> torch.Tensor:
        latent_cache, key_cache = kv_cache
        q_resid = self.q_a_layernorm(self.q_a_proj(x))
        q_nope, q_pe = self.queries(x, q_resid, positions)
        self.write_latent(x, positions, latent_cache, meta)
        if self.indexer is not None:
            step.selection = self.indexer(x, q_resid, positions, key_cache, meta)
        elif step.selection is None:
            raise ValueError("a 'shared' DSA layer needs a 'full' indexer layer before it")
        return self.attend(q_nope, q_pe, latent_cache, meta, step.selection)


class GlmMoeDsaForCausalLM(MlaCausalLM):
    def __init__(self, config):
        kinds = getattr(config, "indexer_types", None) or ["full"] * config.num_hidden_layers
        full = [kind != "shared" for kind in kinds] + [True]  # the MTP layer selects its own keys
        rope = MlaRope(config, config.qk_rope_head_dim, interleaved=True)
        super().__init__(config, lambda layer: DsaAttention(config, rope, full[layer]))
        self.full_indexer = full
        self.index_dim = config.index_head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        num_full = sum(self.full_indexer[: self.num_kv_layers])
        return super().kv_bytes_per_token(dtype) + num_full * self.index_dim * elem

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype, device) -> list:
        latents = super().allocate_kv_cache(num_blocks, block_size, dtype, device)
        keys_shape = (num_blocks, block_size, self.index_dim)
        return [
            (latent, torch.zeros(keys_shape, dtype=dtype, device=device) if full else None)
            for latent, full in zip(latents, self.full_indexer[: self.num_kv_layers], strict=True)
        ]
