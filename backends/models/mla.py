"""Multi-head latent attention (MLA) of GLM-4.7-Flash and GLM-5 over the latent paged cache.

Queries come from a low-rank path (q_a_proj -> RMSNorm -> q_b_proj) or one q_proj; keys and values from a
shared latent c = RMSNorm(kv_a) of kv_lora_rank dims plus one roped key k_pe of qk_rope_head_dim dims
shared by all heads. The cache stores [c | k_pe] per token; kv_b_proj's key and value halves are absorbed
into the query and the output (glm_kernels/mla_reference.py); the attention backend writes the latent rows
and attends over them.

Tensor parallelism splits the attention heads (q_proj / q_b_proj and kv_b_proj by output rows, o_proj by
input columns). The latent is per token, not per head: every rank computes it (kv_a_proj and q_a_proj are
replicated) and keeps the whole latent cache, so the KV cache is not divided by the TP size."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from backends.models.common import RMSNorm, RotaryEmbedding, rope_parameters
from backends.models.glm import GlmCausalLM
from backends.models.moe import StepState
from backends.parallel import ColumnParallelLinear, Linear, RowParallelLinear, current
from glm_kernels.backend import AttentionContext, LayerSpec, MlaCache, MlaSpec


class MlaRope(nn.Module):
    """RoPE on the last dim. Interleaved (DeepSeek layout): pair (x[2i], x[2i+1]) is rotated by frequency i
    and the result is laid out as all first members then all second members, as transformers does; queries
    and keys get the same layout, so their dot products are those of the interleaved rotation."""

    def __init__(self, config, dim: int, interleaved: bool | None = None):
        super().__init__()
        if interleaved is None:
            interleaved = bool(getattr(config, "rope_interleave", True))
        self.interleaved = interleaved
        self.table = RotaryEmbedding(config, dim, config.max_position_embeddings)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, dim]."""
        if not self.interleaved:
            return self.table(positions, x)
        cos = self.table.cos[positions][:, None, :].to(x.dtype)
        sin = self.table.sin[positions][:, None, :].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def softmax_scale(config) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale^2 when the rope scaling asks for it (mscale_all_dim)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    factor, mscale_all_dim = params.get("factor", 1.0), params.get("mscale_all_dim", 0)
    if params.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


class MlaAttention(nn.Module):
    def __init__(self, config, rope: MlaRope):
        super().__init__()
        first, self.num_heads = current().split(config.num_attention_heads, "num_attention_heads")
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.rank = config.kv_lora_rank
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        hidden, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        qk, kv = self.nope_dim + self.rope_dim, self.nope_dim + self.v_dim
        q_heads = [("", first * qk, self.num_heads * qk)]  # this rank's heads of a per-head projection
        if self.q_lora_rank:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, q_heads)
        else:
            self.q_proj = ColumnParallelLinear(hidden, q_heads)
        self.kv_a_proj_with_mqa = Linear(hidden, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = ColumnParallelLinear(self.rank, [("", first * kv, self.num_heads * kv)])
        self.kv_b_proj.packable = False  # only its weight is read (absorbed into q and the output)
        self.o_proj = RowParallelLinear(first * self.v_dim, self.num_heads * self.v_dim, hidden, bias=bias)
        self.rope = rope
        self.scale = softmax_scale(config)

    def forward(
        self, x, positions, kv_cache: MlaCache, attn: AttentionContext, step: StepState
    ) -> torch.Tensor:
        q_resid = self.q_a_layernorm(self.q_a_proj(x)) if self.q_lora_rank else None
        q_nope, q_pe = self.queries(x, q_resid, positions)
        return self.attend(q_nope, q_pe, *self.latent(x, positions), kv_cache, attn, None)

    def queries(self, x, q_resid, positions) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q_b_proj(q_resid) if q_resid is not None else self.q_proj(x)
        q_nope, q_pe = q.view(-1, self.num_heads, self.nope_dim + self.rope_dim).split(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        return q_nope, self.rope(positions, q_pe)

    def latent(self, x, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' cache rows: the normalized latent [T, rank] and the roped shared key [T, rope]."""
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), self.rope(positions, k_pe[:, None, :])[:, 0]

    def attend(self, q_nope, q_pe, c_kv, k_pe, cache: MlaCache, attn: AttentionContext, topk_indices):
        """Write the new rows, attend (DSA: over topk_indices [T, k] only) and project out: [T, hidden]."""
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.rank)
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk)
        o_latent = attn.mla(q_latent, q_pe, c_kv, k_pe, cache, self.scale, topk_indices)
        out = torch.einsum("thr,hvr->thv", o_latent, w_uv)
        return self.o_proj(out.reshape(-1, self.num_heads * self.v_dim))


class MlaCausalLM(GlmCausalLM):
    """A GLM MoE model whose layers use MLA: one latent cache per layer."""

    def __init__(self, config, make_attention: Callable[[int], nn.Module] | None = None):
        if make_attention is None:
            rope = MlaRope(config, config.qk_rope_head_dim)
            make_attention = lambda _layer: MlaAttention(config, rope)  # noqa: E731
        super().__init__(config, make_attention)
        self.latent_spec = MlaSpec(config.kv_lora_rank, config.qk_rope_head_dim)

    def kv_cache_specs(self) -> list[LayerSpec]:
        return [self.latent_spec] * self.num_kv_layers
