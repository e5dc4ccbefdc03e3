"""Layers shared by the model implementations: RMSNorm, rotary embedding, SwiGLU MLP, and the
checkpoint loader (tensor-parallel aware: see backends/parallel.py). Models read their hyper-parameters
from the Hugging Face config object."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backends.parallel import OTHER_RANK, ColumnParallelLinear, RowParallelLinear, Slot, current, read
from glm_kernels.backend import GqaSpec, LayerSpec

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:
        params = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
        if getattr(config, "rope_scaling", None):
            params.update(config.rope_scaling)
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by position. `rotary_dim` may be smaller than the head (partial rotary);
    `interleaved` pairs (x0, x1), (x2, x3)... instead of the two halves."""

    def __init__(self, config, rotary_dim: int, max_positions: int, interleaved: bool = False):
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            base = params.get("rope_theta", 10000.0)
            inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        pos = torch.arange(max_positions, dtype=torch.float)
        freqs = torch.outer(pos, inv_freq.float())
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; rotates the first rotary_dim dims of each head."""
        cos = self.cos[positions][:, None, :].to(x.dtype)
        sin = self.sin[positions][:, None, :].to(x.dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul. Under tensor parallelism gate/up
    are split by columns and down by rows; `reduce=False` leaves down's partial sum to the caller."""

    def __init__(self, hidden: int, intermediate: int, reduce: bool = True):
        super().__init__()
        first, rows = current().split(intermediate, "intermediate_size")
        self.gate_up = ColumnParallelLinear(hidden, [("gate_proj", first, rows), ("up_proj", first, rows)])
        self.down = RowParallelLinear(first, rows, hidden, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def checkpoint_slot(self, rest: str) -> Slot | None:
        """The checkpoint stores gate_proj, up_proj and down_proj separately."""
        proj, _, kind = rest.partition(".")
        if proj == "down_proj":
            slot = self.down.checkpoint_slot(kind)
            return slot.within("down") if slot else None
        slot = self.gate_up.part_slot(proj, kind)
        return slot.within("gate_up") if slot else None


def fused_qkv_slot(qkv: ColumnParallelLinear, rest: str) -> Slot | None:
    """q_proj/k_proj/v_proj.{weight,bias} of an attention layer into its fused `qkv`."""
    proj, _, kind = rest.partition(".")
    slot = qkv.part_slot(proj, kind)
    return slot.within("qkv") if slot else None


# --- checkpoint loading -----------------------------------------------------------------------------------
def load_checkpoint(
    model: nn.Module, named_tensors: Iterable[tuple[str, Any]], num_layers: int, tie: bool, mtp: bool = False
) -> None:
    """Copy a Hugging Face checkpoint into `model` (this rank's parts of it). Names load as they are where
    they match a parameter; fused or split parameters are placed by the innermost module that has a
    `checkpoint_slot(rest)`. Layers from `num_layers` on (GLM's multi-token-prediction layers) are skipped,
    except, with `mtp`, layer num_layers, which loads into model.mtp (less its copies of the embedding and
    the head: mtp.py); lm_head is skipped when tied. Tensors a module gives to another rank (OTHER_RANK)
    are never read. Returns how many tensors of layers from `num_layers` on were skipped."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    skipped_mtp, unknown = 0, []
    mtp_prefix = f"layers.{num_layers}."
    for name, tensor in named_tensors:
        name = name.removeprefix("model.")
        if mtp and name.startswith(mtp_prefix):
            name = "mtp." + name.removeprefix(mtp_prefix)
            if name in ("mtp.embed_tokens.weight", "mtp.shared_head.head.weight"):
                continue
        match = re.match(r"layers\.(\d+)\.", name)
        if match and int(match.group(1)) >= num_layers:
            skipped_mtp += 1
            continue
        if name == "lm_head.weight" and tie:
            continue
        if name.endswith(("_scale_inv", "weight_scale", "input_scale")):
            raise ValueError(
                f"{name}: quantized (FP8) checkpoints are not supported by the native engine; "
                "use the BF16 checkpoint, or the vllm backend"
            )
        slot = find_slot(modules, name) or (Slot(name) if name in params else None)
        if slot is None:
            unknown.append(name)
        elif slot != OTHER_RANK:
            copy_slot(params, slot, tensor, name)
            loaded.add(slot.param)
    if unknown:
        log.warning("ignored %d unknown checkpoint tensors, e.g. %s", len(unknown), unknown[:3])
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return skipped_mtp


def find_slot(modules: dict[str, nn.Module], name: str) -> Slot | None:
    """Ask the innermost enclosing module that knows a checkpoint layout where `name` goes."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = modules.get(".".join(parts[:cut]))
        if module is not None and hasattr(module, "checkpoint_slot"):
            slot = module.checkpoint_slot(".".join(parts[cut:]))
            if slot is not None:
                return slot.within(".".join(parts[:cut]))
    return None


def copy_slot(params: dict[str, nn.Parameter], slot: Slot, tensor: Any, name: str) -> None:
    target = params[slot.param] if slot.index is None else params[slot.param][slot.index]
    part = read(tensor, slot.narrow)
    if target.shape != part.shape:
        where = "" if slot.narrow is None else f" (part {slot.narrow})"
        raise ValueError(
            f"{name}{where}: shape {tuple(part.shape)} != {slot.param}[{slot.index}] {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(part)


class GqaKvCache:
    """What a GQA model's KV cache holds per layer: this rank's KV heads (the attention backend allocates it,
    in its layout). The model sets num_kv_heads, head_dim and num_kv_layers."""

    num_kv_heads: int
    head_dim: int
    num_kv_layers: int  # the model's layers with a KV cache

    def kv_cache_specs(self) -> list[LayerSpec]:
        return [GqaSpec(self.num_kv_heads, self.head_dim, self.head_dim)] * self.num_kv_layers
