"""Llama architecture (the embedded SmolLM2 default) over the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from backends.models.common import RMSNorm, RotaryEmbedding, SwiGLU, load_weights
from kernels.reference import AttentionMetadata, paged_attention, write_kv


class LlamaAttention(nn.Module):
    def __init__(self, config, rope: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = getattr(config, "attention_bias", False)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias)
        self.rope = rope
        self.scale = self.head_dim**-0.5
        self.paged_attention_fn = paged_attention  # the runner installs the profile's kernel

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.rope(positions, q.view(-1, self.num_heads, self.head_dim))
        k = self.rope(positions, k.view(-1, self.num_kv_heads, self.head_dim))
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta)
        out = self.paged_attention_fn(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, rope: RotaryEmbedding):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = LlamaAttention(config, rope)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, kv_cache, meta):
        x = x + self.attn(self.input_norm(x), positions, kv_cache, meta)
        return x + self.mlp(self.post_attn_norm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rope) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, kv, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.tie else self.lm_head.weight
        return hidden @ weight.t()

    # --- KV cache layout -------------------------------------------------------------------------
    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype, device) -> list:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in self.layers
        ]

    # --- weights ---------------------------------------------------------------------------------
    def load_weights(self, named_tensors) -> None:
        attn = self.layers[0].attn
        q, kv = attn.q_size, attn.kv_size
        inter = self.config.intermediate_size
        fused = {
            "self_attn.q_proj": ("attn.qkv", (0, q)),
            "self_attn.k_proj": ("attn.qkv", (q, kv)),
            "self_attn.v_proj": ("attn.qkv", (q + kv, kv)),
            "self_attn.o_proj": ("attn.o_proj", None),
            "mlp.gate_proj": ("mlp.gate_up", (0, inter)),
            "mlp.up_proj": ("mlp.gate_up", (inter, inter)),
            "mlp.down_proj": ("mlp.down", None),
            "input_layernorm": ("input_norm", None),
            "post_attention_layernorm": ("post_attn_norm", None),
        }

        def rename(name: str):
            name = name.removeprefix("model.")
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                module, _, kind = rest.rpartition(".")
                if module not in fused:
                    return None
                target, shard = fused[module]
                return f"layers.{idx}.{target}.{kind}", shard
            if name == "lm_head.weight" and self.tie:
                return None
            return name, None

        loaded = load_weights(self, named_tensors, rename)
        missing = {n for n, _ in self.named_parameters()} - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
