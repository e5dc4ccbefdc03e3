"""What the GLM MoE models share: the sigmoid router with grouped top-k, the routed and shared experts, the
decoder layer (dense MLP for the first layers, MoE after), and the causal-LM skeleton with its checkpoint
loader. Each model file supplies only its attention and KV-cache layout.

Module names follow the Hugging Face checkpoints, so most tensors load by name. Fused parameters (gate+up of
a SwiGLU, q/k/v, per-expert tensors stacked into [experts, ...]) are filled by the module's
`checkpoint_slot(rest)`, which maps the rest of a checkpoint name to (local parameter, index)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from backends.models.common import RMSNorm, SwiGLU

log = logging.getLogger(__name__)

Slot = tuple[str, object]  # (parameter name, index into it or None)


@dataclass(slots=True)
class StepState:
    """State handed from layer to layer within one forward pass (DSA: the last full layer's key selection)."""

    selection: list[torch.Tensor] | None = field(default=None)


class GluMLP(SwiGLU):
    """SwiGLU whose checkpoint stores gate_proj, up_proj and down_proj separately."""

    def checkpoint_slot(self, rest: str) -> Slot | None:
        half = self.gate_up.weight.shape[0] // 2
        slots = {
            "gate_proj.weight": ("gate_up.weight", slice(0, half)),
            "up_proj.weight": ("gate_up.weight", slice(half, 2 * half)),
            "down_proj.weight": ("down.weight", None),
        }
        return slots.get(rest)


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
    """All experts' SwiGLU weights stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]. On CPU the tokens
    are grouped by expert and each expert that received tokens runs one matmul pair."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        tokens = order // top_k
        token_weights = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = tokens[start : start + count]
            gate, up = F.linear(x[rows], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            out.index_add_(0, rows, (y * token_weights[start : start + count, None]).to(x.dtype))
            start += count
        return out

    def checkpoint_slot(self, rest: str) -> Slot | None:
        """The per-expert layout of the hub checkpoints: `<expert>.{gate,up,down}_proj.weight`."""
        match = re.fullmatch(r"(\d+)\.(gate|up|down)_proj\.weight", rest)
        if match is None:
            return None
        expert, kind = int(match.group(1)), match.group(2)
        if kind == "down":
            return "down_proj", expert
        half = self.intermediate
        rows = slice(0, half) if kind == "gate" else slice(half, 2 * half)
        return "gate_up_proj", (expert, rows)


class SparseMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(
            config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        )
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = GluMLP(config.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, *self.gate(x))
        return out + self.shared_experts(x) if self.shared_experts is not None else out


def is_moe_layer(config, layer: int) -> bool:
    """`mlp_layer_types` where the config has it (GLM-4.7-Flash, GLM-5), else `first_k_dense_replace`."""
    kinds = getattr(config, "mlp_layer_types", None)
    if kinds:
        return kinds[layer] == "sparse"
    return layer >= config.first_k_dense_replace


class DecoderLayer(nn.Module):
    def __init__(self, config, layer: int, attention: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe = is_moe_layer(config, layer)
        self.mlp = SparseMoE(config) if moe else GluMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, kv_cache, meta, step: StepState) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class GlmCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head. Subclasses build each layer's attention and own
    the KV-cache layout (kv_bytes_per_token, allocate_kv_cache).

    Multi-token-prediction (MTP) layers, which GLM checkpoints store as layers num_hidden_layers.., are not
    used (no speculative decoding): their tensors are skipped at load."""

    def __init__(self, config, make_attention: Callable[[int], nn.Module]):
        super().__init__()
        self.config = config
        self.num_layers = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, make_attention(i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        step = StepState()
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, positions, kv, meta, step)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.tie else self.lm_head.weight
        return hidden @ weight.t()

    # --- weights ---------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        skipped_mtp, unknown = 0, []
        for name, tensor in named_tensors:
            name = name.removeprefix("model.")
            match = re.match(r"layers\.(\d+)\.", name)
            if match and int(match.group(1)) >= self.num_layers:
                skipped_mtp += 1
                continue
            if name == "lm_head.weight" and self.tie:
                continue
            if name.endswith(("_scale_inv", "weight_scale", "input_scale")):
                raise ValueError(
                    f"{name}: quantized (FP8) checkpoints are not supported by the native engine; "
                    "use the BF16 checkpoint, or the vllm backend"
                )
            slot = (name, None) if name in params else _checkpoint_slot(modules, name)
            if slot is None:
                unknown.append(name)
                continue
            _copy_into(params, slot, tensor, name)
            loaded.add(slot[0])
        if skipped_mtp:
            log.info("skipped %d tensors of the MTP layer(s) (no speculative decoding)", skipped_mtp)
        if unknown:
            log.warning("ignored %d unknown checkpoint tensors, e.g. %s", len(unknown), unknown[:3])
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def _checkpoint_slot(modules: dict[str, nn.Module], name: str) -> Slot | None:
    """Ask the innermost enclosing module that knows a checkpoint layout where `name` goes."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = modules.get(".".join(parts[:cut]))
        if module is not None and hasattr(module, "checkpoint_slot"):
            slot = module.checkpoint_slot(".".join(parts[cut:]))
            if slot is not None:
                return f"{'.'.join(parts[:cut])}.{slot[0]}", slot[1]
    return None


def _copy_into(params: dict[str, nn.Parameter], slot: Slot, tensor: torch.Tensor, name: str) -> None:
    param_name, index = slot
    target = params[param_name] if index is None else params[param_name][index]
    if target.shape != tensor.shape:
        raise ValueError(
            f"{name}: shape {tuple(tensor.shape)} != {param_name}[{index}] {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(tensor)
