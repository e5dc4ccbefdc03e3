"""What the GLM MoE models' layers share: the sigmoid router with grouped top-k, the routed and shared experts,
and the decoder layer (dense MLP for the first layers, MoE after); the causal-LM skeleton is glm.py's. Each
model file supplies only its attention and what its KV cache holds.

Module names follow the Hugging Face checkpoints, so most tensors load by name. Fused parameters (gate+up of
a SwiGLU, q/k/v, per-expert tensors stacked into [experts, ...]) are filled by the module's
`checkpoint_slot(rest)` (common.load_checkpoint).

Tensor parallelism: each rank holds a contiguous range of the routed experts (whole experts, all of their
weights) and runs them on every token routed to them; the router is replicated, so every rank picks the same
experts. The shared experts are split like a dense MLP (columns of gate/up, rows of down). Both give partial
sums, which one all_reduce per MoE block adds up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from backends.models.common import RMSNorm, SwiGLU
from backends.parallel import OTHER_RANK, Narrow, Slot, current
from glm_kernels.backend import AttentionContext

__all__ = ["DecoderLayer", "GluMLP", "Slot", "StepState"]


@dataclass(slots=True)
class StepState:
    """State handed from layer to layer within one forward pass (DSA: the last full layer's key selection)."""

    topk_indices: torch.Tensor | None = field(default=None)  # [T, index_topk] key positions, -1 = padding


GluMLP = SwiGLU  # the checkpoint stores gate_proj, up_proj and down_proj separately


class Fp32Params(nn.Module):
    """Parameters that stay float32 when the model is cast to a lower precision (only the device follows),
    as Hugging Face keeps the router and the DSA head weights in float32."""

    def _apply(self, fn, recurse=True):
        device = fn(torch.empty(0, device=next(self.parameters()).device)).device
        for param in self.parameters():
            param.data = param.data.to(device=device, dtype=torch.float32)
        return self


class Fp32Linear(Fp32Params):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)


class TopkRouter(Fp32Params):
    """Sigmoid scores; experts are chosen on score + correction bias, first the best `topk_group` groups
    (a group's score is the sum of its two best experts), then the best experts within them. The chosen
    experts are weighted by their plain scores, optionally normalized, times routed_scaling_factor."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.normalize = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight).sigmoid()
        biased = scores + self.e_score_correction_bias
        grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        best_groups = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        biased = biased.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        expert_ids = biased.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, expert_ids)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return expert_ids, weights * self.scaling


class RoutedExperts(nn.Module):
    """The SwiGLU weights of this rank's experts [first, first + count) stacked: gate_up_proj [count, 2I, H],
    down_proj [count, H, I]. On CPU the tokens are grouped by expert and each expert that received tokens
    runs one matmul pair. Under tensor parallelism the output is this rank's partial sum."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.first, count = current().spread(num_experts, "n_routed_experts")
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(count, hidden, intermediate))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // top_k
        token_weights = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = sum(counts[: self.first])
        for expert, count in enumerate(counts[self.first : self.first + self.gate_up_proj.shape[0]]):
            if count == 0:
                continue
            rows = tokens[start : start + count]
            gate, up = F.linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            out.index_add_(0, rows, (y * token_weights[start : start + count, None]).to(x.dtype))
            start += count
        return out

    def checkpoint_slot(self, rest: str) -> Slot | None:
        """The per-expert layout of the hub checkpoints, `<expert>.{gate,up,down}_proj.weight`, and the stacked
        one of transformers' state dict, `gate_up_proj` / `down_proj`."""
        count = self.gate_up_proj.shape[0]
        if rest in ("gate_up_proj", "down_proj"):
            return Slot(rest, None, Narrow(0, self.first, count))
        match = re.fullmatch(r"(\d+)\.(gate|up|down)_proj\.weight", rest)
        if match is None:
            return None
        expert, kind = int(match.group(1)) - self.first, match.group(2)
        if not 0 <= expert < count:
            return OTHER_RANK
        if kind == "down":
            return Slot("down_proj", expert)
        half = self.intermediate
        rows = slice(0, half) if kind == "gate" else slice(half, 2 * half)
        return Slot("gate_up_proj", (expert, rows))


class SparseMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = GluMLP(config.hidden_size, shared, reduce=False) if shared else None
        self.tp = current()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, *self.gate(x))
        out = out + self.shared_experts(x) if self.shared_experts is not None else out
        return self.tp.all_reduce(out)


def is_moe_layer(config, layer: int) -> bool:
    """`mlp_layer_types` where the config has it (GLM-4.7-Flash, GLM-5), else `first_k_dense_replace`."""
    kinds = getattr(config, "mlp_layer_types", None)
    if kinds and layer < len(kinds):
        return kinds[layer] == "sparse"
    return layer >= config.first_k_dense_replace  # the MTP layer (num_hidden_layers) is an MoE layer


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int, attention: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = is_moe_layer(config, layer)
        self.mlp = SparseMoE(config) if moe else GluMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, kv_cache, attn: AttentionContext, step: StepState) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, attn, step)
        return x + self.mlp(self.post_attention_layernorm(x))
