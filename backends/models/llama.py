"""Llama architecture (the embedded SmolLM2 default) over the paged KV cache. Module names follow the
Hugging Face checkpoint, so tensors load by name; under tensor parallelism each rank holds its heads
(backends/parallel.py)."""

from __future__ import annotations

import torch
from torch import nn

from backends.models.common import (
    GqaKvCache,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    fused_qkv_slot,
    load_checkpoint,
)
from backends.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    Slot,
    VocabParallelEmbedding,
    attention_heads,
    current,
)
from glm_kernels.backend import AttentionContext, GqaCache


class LlamaAttention(nn.Module):
    def __init__(self, config, rope: RotaryEmbedding):
        super().__init__()
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        (q0, self.num_heads), (k0, self.num_kv_heads) = attention_heads(current(), heads, kv_heads)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        bias = getattr(config, "attention_bias", False)
        d = self.head_dim
        self.q_size = self.num_heads * d
        self.kv_size = self.num_kv_heads * d
        parts = [
            ("q_proj", q0 * d, self.q_size),
            ("k_proj", k0 * d, self.kv_size),
            ("v_proj", k0 * d, self.kv_size),
        ]
        self.qkv = ColumnParallelLinear(config.hidden_size, parts, bias=bias)
        self.o_proj = RowParallelLinear(q0 * d, self.q_size, config.hidden_size, bias=bias)
        self.rope = rope
        self.scale = self.head_dim**-0.5

    def forward(self, x, positions, kv_cache: GqaCache, attn: AttentionContext):
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.rope(positions, q.view(-1, self.num_heads, self.head_dim))
        k = self.rope(positions, k.view(-1, self.num_kv_heads, self.head_dim))
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = attn.gqa(q, k, v, kv_cache, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))

    def checkpoint_slot(self, rest: str) -> Slot | None:
        return fused_qkv_slot(self.qkv, rest)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, rope: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rope)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, kv_cache: GqaCache, attn: AttentionContext):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(GqaKvCache, nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rope) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie else ParallelLMHead(config.vocab_size, config.hidden_size)
        self.num_kv_heads = self.layers[0].self_attn.num_kv_heads  # this rank's
        self.head_dim = head_dim
        self.num_kv_layers = len(self.layers)

    def forward(self, input_ids, positions, kv_caches, attn: AttentionContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, kv, attn)
        return self.norm(x)

    def logits_layer(self) -> VocabParallelEmbedding:
        """The vocabulary rows logits are computed with: the embedding when tied, else lm_head."""
        return self.embed_tokens if self.tie else self.lm_head

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under tensor parallelism on rank 0 only (None elsewhere)."""
        return self.logits_layer().logits(hidden)

    def load_weights(self, named_tensors) -> None:
        load_checkpoint(self, named_tensors, len(self.layers), self.tie)
