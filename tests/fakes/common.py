"""Plain attention math shared by the fakes (FAKE: test support, not vendor code)."""

from __future__ import annotations

import torch


class FakeOpError(ValueError):
    """A call that breaks the vendor op's documented contract."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise FakeOpError(message)


def gather_pages(cache: torch.Tensor, table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Rows [length, ...] of one request from a [num_blocks, block_size, ...] cache."""
    blocks = (length + block_size - 1) // block_size
    require(table.shape[0] >= blocks, f"block_table row has {table.shape[0]} blocks, needs {blocks}")
    return cache[table[:blocks].long()].reshape(-1, *cache.shape[2:])[:length]


def attend(
    q: torch.Tensor,  # [Sq, heads, D]
    k: torch.Tensor,  # [Skv, kv_heads, D]
    v: torch.Tensor,  # [Skv, kv_heads, Dv]
    scale: float,
    allowed: torch.Tensor,  # [Sq, Skv] bool
) -> torch.Tensor:
    """softmax(scale q k^T, masked) v in fp32 with GQA head mapping h -> h // (heads // kv_heads)."""
    rep = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1))  # a row that sees nothing gives zeros
    return torch.einsum("hqk,khd->qhd", weights, v)


def bottom_right_causal(q_len: int, kv_len: int) -> torch.Tensor:
    """Row i sees keys <= kv_len - q_len + i (the new tokens are the last q_len of the kv_len keys)."""
    return torch.arange(kv_len)[None, :] <= (kv_len - q_len + torch.arange(q_len))[:, None]
