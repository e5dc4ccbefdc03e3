"""Layers shared by the model implementations: RMSNorm, rotary embedding, SwiGLU MLP, and the
weight-loading helper. Models read their hyper-parameters from the Hugging Face config object."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def load_weights(module: nn.Module, named_tensors, rename) -> set[str]:
    """Copy checkpoint tensors into the module. `rename(name) -> (param_name, shard) | None` maps a
    checkpoint name to our parameter and, for fused parameters, which slice (index, count) it fills along
    dim 0. Returns the parameter names that were loaded."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in named_tensors:
        target = rename(name)
        if target is None:
            continue
        param_name, shard = target
        if param_name not in params:
            raise KeyError(f"checkpoint tensor {name} maps to unknown parameter {param_name}")
        param = params[param_name]
        with torch.no_grad():
            if shard is None:
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: shape {tuple(tensor.shape)} != {param_name} {tuple(param.shape)}"
                    )
                param.copy_(tensor)
            else:
                offset, size = shard
                param[offset : offset + size].copy_(tensor)
        loaded.add(param_name)
    return loaded
