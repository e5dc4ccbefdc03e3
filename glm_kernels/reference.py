"""Plain-torch paged attention: the correctness oracle, and the CPU kernel.

One step holds a mix of prefill chunks and decode tokens of different requests. Tokens are flattened
([T, heads, dim]); each request's new tokens sit at query positions [start, start + q_len) and attend
causally to everything before them in its own KV blocks. The batch is split into two groups, decode
tokens (q_len == 1), in buckets of similar context length, and prefill chunks, so that one long context
or chunk does not pad every row; each group gathers its KV blocks into a padded [S, L, kv_heads, dim]
tensor and runs one SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DECODE_BUCKET = 16  # decode rows per group, sorted by context length: less key padding per SDPA call


@dataclass(slots=True)
class AttnGroup:
    """Requests of one group, padded to max_q query rows and max_kv keys."""

    token_index: torch.Tensor  # [S, max_q] index into the flattened tokens (padding repeats a valid index)
    valid: torch.Tensor  # [S, max_q] bool: real query rows
    block_tables: torch.Tensor  # [S, max_blocks]
    mask: (
        torch.Tensor | None
    )  # [S, 1, max_q, max_kv] bool, True = attend; None for decode (key padding via kv_mask)
    kv_mask: torch.Tensor  # [S, 1, 1, max_kv] bool: keys inside each request's context
    max_kv: int
    flat_out_index: torch.Tensor  # [n_valid] positions in the flattened output for the valid rows


@dataclass(slots=True)
class StepRows:
    """The step per request, for kernels that walk block tables themselves (glm_kernels/cpu_paged.py)."""

    decode_tokens: torch.Tensor  # [S] rows of the flattened tokens that are decode tokens (q_len 1)
    decode_tables: torch.Tensor  # [S, max_blocks] int32, padded with block 0
    decode_lens: torch.Tensor  # [S] int32: context length including the new token
    prefill: list[tuple[int, int, int, list[int]]]  # (first row, start position, q_len, block table)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # per first row: built by the first layer


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] block_id * block_size + offset for each new token
    groups: list[AttnGroup]
    num_tokens: int
    block_size: int
    rows: StepRows


def build_metadata(
    starts: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for one step, built once and shared by every layer."""
    slots: list[int] = []
    for start, q_len, table in zip(starts, query_lens, block_tables, strict=True):
        for pos in range(start, start + q_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    offsets = [0]
    for q_len in query_lens:
        offsets.append(offsets[-1] + q_len)
    decode = sorted((i for i, q in enumerate(query_lens) if q == 1), key=lambda i: starts[i])
    prefill = [i for i, q in enumerate(query_lens) if q > 1]
    buckets = [decode[k : k + DECODE_BUCKET] for k in range(0, len(decode), DECODE_BUCKET)]
    groups = [
        _group(idx, starts, query_lens, block_tables, offsets, block_size, device)
        for idx in (*buckets, prefill)
        if idx
    ]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        groups=groups,
        num_tokens=offsets[-1],
        block_size=block_size,
        rows=_rows(decode, prefill, starts, query_lens, block_tables, offsets, block_size, device),
    )


def _rows(decode, prefill, starts, query_lens, block_tables, offsets, block_size, device) -> StepRows:
    needed = [(starts[i] + block_size) // block_size for i in decode]  # blocks holding start + 1 tokens
    width = max(needed, default=0)
    tables = [block_tables[i][:n] + [0] * (width - n) for i, n in zip(decode, needed, strict=True)]
    return StepRows(
        decode_tokens=torch.tensor([offsets[i] for i in decode], dtype=torch.long, device=device),
        decode_tables=torch.tensor(tables, dtype=torch.int32, device=device).view(len(decode), width),
        decode_lens=torch.tensor([starts[i] + 1 for i in decode], dtype=torch.int32, device=device),
        prefill=[(offsets[i], starts[i], query_lens[i], block_tables[i]) for i in prefill],
    )


def _group(idx, starts, query_lens, block_tables, offsets, block_size, device) -> AttnGroup:
    max_q = max(query_lens[i] for i in idx)
    seq_lens = [starts[i] + query_lens[i] for i in idx]
    max_kv = max(seq_lens)
    max_blocks = (max_kv + block_size - 1) // block_size
    tables = [
        block_tables[i][:max_blocks] + [0] * (max_blocks - len(block_tables[i][:max_blocks])) for i in idx
    ]
    q_off = torch.arange(max_q)
    first = torch.tensor([offsets[i] for i in idx])
    q_len = torch.tensor([query_lens[i] for i in idx])
    valid = q_off[None, :] < q_len[:, None]
    token_index = first[:, None] + torch.minimum(q_off[None, :], q_len[:, None] - 1)
    kv_pos = torch.arange(max_kv)
    kv_mask = kv_pos[None, :] < torch.tensor(seq_lens)[:, None]
    mask = None
    if max_q > 1:
        q_pos = torch.tensor([starts[i] for i in idx])[:, None] + q_off[None, :]  # [S, max_q]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_mask[:, None, :]
        mask = mask[:, None].to(device)
    return AttnGroup(
        token_index=token_index.to(device),
        valid=valid.to(device),
        block_tables=torch.tensor(tables, dtype=torch.long, device=device),
        mask=mask,
        kv_mask=kv_mask[:, None, None, :].to(device),
        max_kv=max_kv,
        flat_out_index=token_index[valid].to(device),
    )


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> None:
    """Store the new tokens' K and V ([T, kv_heads, dim]) into their slots of the paged cache."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, group: AttnGroup) -> torch.Tensor:
    """[num_blocks, block_size, *rest] -> [S, max_kv, *rest] for the group's block tables."""
    s, nb = group.block_tables.shape
    gathered = cache.index_select(0, group.block_tables.reshape(-1))
    return gathered.view(s, nb * cache.shape[1], *cache.shape[2:])[:, : group.max_kv]


def paged_attention(
    q: torch.Tensor,  # [T, heads, dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the new tokens over their requests' cached context (the new tokens' KV must already be
    written). Returns [T, heads, v_dim]."""
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for group in meta.groups:
        s, max_q = group.token_index.shape
        qg = q.index_select(0, group.token_index.reshape(-1)).view(s, max_q, *q.shape[1:]).transpose(1, 2)
        kg = gather_kv(k_cache, group).transpose(1, 2).to(q.dtype)  # [S, kv_heads, max_kv, dim]
        vg = gather_kv(v_cache, group).transpose(1, 2).to(q.dtype)
        mask = group.mask if group.mask is not None else group.kv_mask
        o = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=qg.shape[1] != kg.shape[1]
        ).transpose(1, 2)  # [S, max_q, heads, v_dim]
        rows = o.reshape(s, *o.shape[2:]) if max_q == 1 else o[group.valid]
        out.index_copy_(0, group.flat_out_index, rows)
    return out


def naive_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """Dense causal attention of one request's q_len new tokens (positions start..) over its full context
    keys/values ([L, kv_heads, dim]); used by tests as the simplest possible statement of the semantics."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    rep = heads // kv_heads
    k = keys.repeat_interleave(rep, dim=1)
    v = values.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    q_pos = torch.arange(start, start + q.shape[0])[:, None]
    allowed = torch.arange(keys.shape[0])[None, :] <= q_pos
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype)
