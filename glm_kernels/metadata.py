"""The step as every attention backend sees it: built once per step from the scheduler's output (the runner's
StepInputs) and shared by all layers.

One step holds a mix of prefill chunks and decode tokens of different requests. Tokens are flattened
([T, ...]); request i's new tokens are rows [query_start[i], query_start[i + 1]) at positions
[starts[i], starts[i] + query_lens[i]), and they attend causally to everything before them in the request's
KV blocks. Host lists and device tensors both: kernels that take lengths as host ints (torch_npu's) read the
lists, the others the tensors; neither needs a device-to-host copy.

AttentionMetadata adds the grouping every backend's metadata starts from: decode tokens (q_len == 1) in
buckets of similar context length, and the prefill chunks, so that one long context or chunk does not pad
every row; each group can gather its KV blocks into a padded [S, L, ...] tensor (gather_kv) for one batched
call. The plain-torch kernels (glm_kernels/reference.py, mla_reference.py: the correctness oracle, the DSA
top-k) run over it; the other backends add what their own kernels read. write_rows is the slot write of
block-major caches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_BUCKET = 16  # decode rows per group, sorted by context length: less key padding per batched call


@dataclass(frozen=True, slots=True)
class StepMetadata:
    """One forward pass's requests (S of them) and new tokens (T), kernel-neutral."""

    block_size: int
    starts: list[int]  # per request: tokens already in its KV cache
    query_lens: list[int]  # per request: new tokens this step
    seq_lens_host: list[int]  # per request: starts + query_lens
    query_start_host: list[int]  # [S + 1] cumulative query_lens
    block_tables_host: list[list[int]]  # per request: its KV blocks, in order
    positions: torch.Tensor  # [T] long: each new token's position in its request
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset of each new token's KV row
    query_start: torch.Tensor  # [S + 1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with block 0

    @property
    def num_tokens(self) -> int:
        return self.query_start_host[-1]

    @property
    def num_requests(self) -> int:
        return len(self.starts)

    @property
    def device(self) -> torch.device:
        return self.slot_mapping.device


def build_step_metadata(
    starts: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> StepMetadata:
    positions: list[int] = []
    slots: list[int] = []
    for start, q_len, table in zip(starts, query_lens, block_tables, strict=True):
        for pos in range(start, start + q_len):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    query_start = [0]
    for q_len in query_lens:
        query_start.append(query_start[-1] + q_len)
    seq_lens = [s + q for s, q in zip(starts, query_lens, strict=True)]
    width = max((len(t) for t in block_tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    return StepMetadata(
        block_size=block_size,
        starts=list(starts),
        query_lens=list(query_lens),
        seq_lens_host=seq_lens,
        query_start_host=query_start,
        block_tables_host=[list(t) for t in block_tables],
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(padded), width),
    )


@dataclass(frozen=True, slots=True)
class AttnGroup:
    """Requests of one group, padded to max_q query rows and max_kv keys."""

    requests: list[int]  # the step's request indices in this group
    token_index: torch.Tensor  # [S, max_q] index into the flattened tokens (padding repeats a valid index)
    valid: torch.Tensor  # [S, max_q] bool: real query rows
    block_tables: torch.Tensor  # [S, max_blocks] long
    mask: torch.Tensor | None  # [S, 1, max_q, max_kv] bool, True = attend; None for decode (see kv_mask)
    kv_mask: torch.Tensor  # [S, 1, 1, max_kv] bool: keys inside each request's context
    max_q: int
    max_kv: int
    flat_out_index: torch.Tensor  # [n_valid] positions in the flattened output for the valid rows
    valid_rows: torch.Tensor  # [n_valid] the valid rows' indices in [S * max_q] (gathers without a host sync)

    @property
    def is_decode(self) -> bool:
        return self.max_q == 1


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """The step and its groups; every backend's metadata is this or a subclass that adds its kernels' views."""

    step: StepMetadata
    groups: list[AttnGroup]


def partition(step: StepMetadata) -> list[list[int]]:
    """Request indices per group: decode buckets by context length, then the prefill chunks."""
    decode = sorted((i for i, q in enumerate(step.query_lens) if q == 1), key=lambda i: step.starts[i])
    prefill = [i for i, q in enumerate(step.query_lens) if q > 1]
    buckets = [decode[k : k + DECODE_BUCKET] for k in range(0, len(decode), DECODE_BUCKET)]
    return [idx for idx in (*buckets, prefill) if idx]


def group_step(step: StepMetadata) -> list[AttnGroup]:
    return [_group(idx, step) for idx in partition(step)]


def build_metadata(
    starts: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """The plain-torch kernels' metadata for a step given as lists (tests, benchmarks)."""
    step = build_step_metadata(starts, query_lens, block_tables, block_size, device)
    return AttentionMetadata(step, group_step(step))


def _group(idx: list[int], step: StepMetadata) -> AttnGroup:
    device = step.device
    query_lens = [step.query_lens[i] for i in idx]
    seq_lens = [step.seq_lens_host[i] for i in idx]
    max_q, max_kv = max(query_lens), max(seq_lens)
    max_blocks = (max_kv + step.block_size - 1) // step.block_size
    tables = [step.block_tables_host[i][:max_blocks] for i in idx]
    tables = [t + [0] * (max_blocks - len(t)) for t in tables]
    q_off = torch.arange(max_q)
    first = torch.tensor([step.query_start_host[i] for i in idx])
    q_len = torch.tensor(query_lens)
    valid = q_off[None, :] < q_len[:, None]
    token_index = first[:, None] + torch.minimum(q_off[None, :], q_len[:, None] - 1)
    kv_pos = torch.arange(max_kv)
    kv_mask = kv_pos[None, :] < torch.tensor(seq_lens)[:, None]
    mask = None
    if max_q > 1:
        q_pos = torch.tensor([step.starts[i] for i in idx])[:, None] + q_off[None, :]  # [S, max_q]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_mask[:, None, :]
        mask = mask[:, None].to(device)
    return AttnGroup(
        requests=idx,
        token_index=token_index.to(device),
        valid=valid.to(device),
        block_tables=torch.tensor(tables, dtype=torch.long, device=device),
        mask=mask,
        kv_mask=kv_mask[:, None, None, :].to(device),
        max_q=max_q,
        max_kv=max_kv,
        flat_out_index=token_index[valid].to(device),
        valid_rows=valid.flatten().nonzero().flatten().to(device),
    )


def gather_kv(cache: torch.Tensor, group: AttnGroup) -> torch.Tensor:
    """[num_blocks, block_size, *rest] -> [S, max_kv, *rest] for the group's block tables."""
    s, nb = group.block_tables.shape
    gathered = cache.index_select(0, group.block_tables.reshape(-1))
    return gathered.view(s, nb * cache.shape[1], *cache.shape[2:])[:, : group.max_kv]


def causal_mask(group: AttnGroup) -> torch.Tensor:
    """[S, 1, max_q or 1, max_kv] bool: the keys each query row may see."""
    return group.mask if group.mask is not None else group.kv_mask


def write_rows(cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' rows ([T, *rest]) in their slots of a block-major [num_blocks, block_size, *rest]
    cache."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, rows.to(cache.dtype))
