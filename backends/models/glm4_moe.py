"""GLM-4.5 / 4.6 / 4.7 (model_type glm4_moe): GQA attention with partial rotary (the first half of each
head by default), optional q/k RMSNorm and q/k/v bias, over the paged KV cache; MoE from moe.py. Under tensor
parallelism each rank holds its query and KV heads (backends/parallel.py: attention_heads)."""

from __future__ import annotations

import torch
from torch import nn

from backends.models.common import GqaKvCache, RMSNorm, RotaryEmbedding, fused_qkv_slot, rope_parameters
from backends.models.glm import GlmCausalLM
from backends.models.moe import StepState
from backends.parallel import ColumnParallelLinear, RowParallelLinear, Slot, attention_heads, current
from glm_kernels.backend import AttentionContext, GqaCache


class Glm4MoeAttention(nn.Module):
    def __init__(self, config, rope: RotaryEmbedding):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        (q0, self.num_heads), (k0, self.num_kv_heads) = attention_heads(current(), heads, kv_heads)
        self.head_dim = d = head_dim(config)
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        bias = bool(getattr(config, "attention_bias", False))
        parts = [
            ("q_proj", q0 * d, self.q_size),
            ("k_proj", k0 * d, self.kv_size),
            ("v_proj", k0 * d, self.kv_size),
        ]
        self.qkv = ColumnParallelLinear(config.hidden_size, parts, bias=bias)
        self.o_proj = RowParallelLinear(q0 * d, self.q_size, config.hidden_size)
        self.use_qk_norm = bool(getattr(config, "use_qk_norm", False))
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rope = rope
        self.scale = self.head_dim**-0.5

    def forward(
        self, x, positions, kv_cache: GqaCache, attn: AttentionContext, step: StepState
    ) -> torch.Tensor:
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q), self.rope(positions, k)
        out = attn.gqa(q, k, v.view(-1, self.num_kv_heads, self.head_dim), kv_cache, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))

    def checkpoint_slot(self, rest: str) -> Slot | None:
        return fused_qkv_slot(self.qkv, rest)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Glm4MoeForCausalLM(GqaKvCache, GlmCausalLM):
    def __init__(self, config):
        dim = head_dim(config)
        params = rope_parameters(config)
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 0.5))
        rope = RotaryEmbedding(config, int(dim * factor), config.max_position_embeddings)
        super().__init__(config, lambda _layer: Glm4MoeAttention(config, rope))
        self.num_kv_heads = self.layers[0].self_attn.num_kv_heads  # this rank's
        self.head_dim = dim
