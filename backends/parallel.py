"""Tensor parallelism of the native engine: who this rank is, the process group, and the layers that split
a model across ranks.

One process per rank: rank 0 is the engine process, ranks 1.. are workers (backends/tp_worker.py). Layers
read this rank's place from `current()` when they are built (the runner builds the model inside
`use(TensorParallel(rank, size))`) and size their parameters to its part. At size 1 every layer is a plain
nn.Linear / nn.Embedding that never touches torch.distributed, so a single-device engine pays nothing.

- ColumnParallelLinear: output features split (q/k/v heads, gate/up columns); nothing to communicate.
- RowParallelLinear: input features split (o_proj, down_proj); the partial sums are all_reduced.
- VocabParallelEmbedding: vocab rows split in equal (padded) shards; a rank embeds only the ids it holds
  and zeros the others, and the all_reduce adds the one rank that had each id. ParallelLMHead: the same
  rows as logits, gathered to rank 0 (the only rank that samples).

Weights are read in parts: a layer's `checkpoint_slot(rest)` returns a Slot that names the Narrow (dim,
start, size) of the checkpoint tensor this rank needs, and `read` takes only that part from a lazy
safetensors slice, so no rank reads another rank's shard from disk."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm_kernels import cpu_linear

log = logging.getLogger(__name__)

TIMEOUT_ENV = "GLM_SERVE_TP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0  # one collective (a forward step, a gather) may wait this long for the other ranks
IDLE_TIMEOUT = timedelta(days=3650)  # workers wait on the control group for as long as the engine idles


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group. Collectives use the default process group."""

    rank: int = 0
    size: int = 1

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(first, count) of this rank's equal part of `total` items; `what` names them in the error."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {self.size}")
        count = total // self.size
        return self.rank * count, count

    def spread(self, total: int, what: str) -> tuple[int, int]:
        """(first, count) of this rank's part of `total` items split as evenly as possible (MoE experts)."""
        if total < self.size:
            raise ValueError(f"{what} ({total}) is fewer than tensor_parallel_size {self.size}")
        first = self.rank * total // self.size
        return first, (self.rank + 1) * total // self.size - first

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_reduce_min(self, value: int, device: torch.device) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=device)  # nccl/hccl reduce device tensors
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_columns(self, x: torch.Tensor, total: int) -> torch.Tensor | None:
        """Rank 0 gets every rank's columns side by side, cut to `total`; the other ranks get None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1)[..., :total] if parts is not None else None


_SINGLE = TensorParallel()
_CURRENT: contextvars.ContextVar[TensorParallel | None] = contextvars.ContextVar("tp", default=None)


def current() -> TensorParallel:
    return _CURRENT.get() or _SINGLE


@contextlib.contextmanager
def use(tp: TensorParallel) -> Iterator[TensorParallel]:
    """Build layers for `tp` inside this block."""
    token = _CURRENT.set(tp)
    try:
        yield tp
    finally:
        _CURRENT.reset(token)


def attention_heads(tp: TensorParallel, num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], ...]:
    """((first, count) query heads, (first, count) KV heads) of this rank. KV heads are split like the
    query heads when tp divides their number; when tp is a multiple of it, each rank keeps (a replica of)
    the one KV head its query heads read, as GQA groups consecutive query heads."""
    q = tp.split(num_heads, "num_attention_heads")
    if num_kv_heads % tp.size == 0:
        return q, tp.split(num_kv_heads, "num_key_value_heads")
    if tp.size % num_kv_heads == 0:
        return q, (tp.rank * num_kv_heads // tp.size, 1)
    raise ValueError(
        f"num_key_value_heads ({num_kv_heads}) must divide or be a multiple of tensor_parallel_size {tp.size}"
    )


# --- process group --------------------------------------------------------------------------------------
def collective_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(device: str, rank: int, world: int, port: int, timeout_s: float) -> Any:
    """Join the group of `world` ranks over the device adapter's backend (gloo, nccl, hccl, cncl), meeting
    on 127.0.0.1:port where rank 0 hosts the store. Returns the control group: gloo, whose timeout is long
    because workers wait there for the next step while the engine idles; the default group's `timeout_s`
    bounds every model collective, so a dead or stuck rank becomes an error instead of a hang."""
    from backends.devices import get_device

    if dist.is_initialized():
        raise RuntimeError("tensor parallelism needs its own process group, but one is already initialized")
    dist.init_process_group(
        get_device(device).dist_backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- checkpoint parts -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Narrow:
    """The part of a checkpoint tensor a rank reads: `size` entries from `start` along `dim`."""

    dim: int
    start: int
    size: int


class Slot(NamedTuple):
    """Where a checkpoint tensor goes: parameter name, index into the parameter (None: all of it), and the
    part of the tensor to read (None: all of it). OTHER_RANK: the tensor belongs to another rank."""

    param: str
    index: Any = None
    narrow: Narrow | None = None

    def within(self, prefix: str) -> Slot:
        return self if self.param == "" else Slot(f"{prefix}.{self.param}", self.index, self.narrow)


OTHER_RANK = Slot("")


def read(tensor: Any, narrow: Narrow | None) -> torch.Tensor:
    """The part of a checkpoint tensor: a torch.Tensor, or a lazy safetensors slice (only that part is read)."""
    if isinstance(tensor, torch.Tensor):
        return tensor if narrow is None else tensor.narrow(narrow.dim, narrow.start, narrow.size)
    if narrow is None:
        return tensor[:]
    return tensor[(slice(None),) * narrow.dim + (slice(narrow.start, narrow.start + narrow.size),)]


# --- layers ---------------------------------------------------------------------------------------------
class Linear(nn.Linear):
    """nn.Linear whose weight the runner may pre-pack for the device (glm_kernels/cpu_linear.py): `packed` is
    then used for the matmul, the dense `weight` stays for loading and for readers of it."""

    packed: torch.Tensor | None = None
    packable = True  # False where the layer is never called, only its weight read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return cpu_linear.linear(x, self.packed, bias)
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(Linear):
    """Output features split across ranks; nothing to communicate. `parts` fuses projections into one
    matmul: (checkpoint name, first row, rows) of this rank's part of each (q/k/v, gate/up); a single
    projection is the part named ""."""

    def __init__(self, in_features: int, parts: Sequence[tuple[str, int, int]], bias: bool = False):
        super().__init__(in_features, sum(rows for _, _, rows in parts), bias=bias)
        self.parts: dict[str, tuple[int, Narrow]] = {}
        offset = 0
        for name, first, rows in parts:
            self.parts[name] = (offset, Narrow(0, first, rows))
            offset += rows

    def part_slot(self, part: str, kind: str) -> Slot | None:
        if part not in self.parts or kind not in ("weight", "bias"):
            return None
        offset, narrow = self.parts[part]
        return Slot(kind, slice(offset, offset + narrow.size), narrow)

    def checkpoint_slot(self, rest: str) -> Slot | None:
        return self.part_slot("", rest)


class RowParallelLinear(Linear):
    """Input features split: this rank holds columns [first, first + in_features) of the weight and
    multiplies its slice of the input (a column-parallel output). The partial sums are all_reduced, unless
    `reduce` is False: then the caller reduces a sum of several partial outputs once (the MoE block). The
    bias is added once: after the reduction, or on rank 0 alone."""

    def __init__(
        self, first: int, in_features: int, out_features: int, bias: bool = False, reduce: bool = True
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = current()
        self.narrow = Narrow(1, first, in_features)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.matmul(x, self.bias)
        y = self.matmul(x)
        if self.reduce:
            self.tp.all_reduce(y)
        if self.bias is not None and (self.reduce or self.tp.rank == 0):
            y = y + self.bias
        return y

    def checkpoint_slot(self, rest: str) -> Slot | None:
        return {"weight": Slot("weight", None, self.narrow), "bias": Slot("bias")}.get(rest)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [first, first + held) of the vocabulary; every rank has ceil(vocab / tp) rows, the last one's
    padding rows are zero and never looked up (ids < vocab) and cut from the gathered logits."""

    packed: torch.Tensor | None = None  # the weight pre-packed for logits (glm_kernels/cpu_linear.py)

    def __init__(self, vocab_size: int, dim: int):
        tp = current()
        rows = -(-vocab_size // tp.size)
        super().__init__(rows, dim)
        self.tp = tp
        self.vocab_size = vocab_size
        self.first = tp.rank * rows
        self.held = max(0, min(rows, vocab_size - self.first))
        if self.held < rows:
            with torch.no_grad():
                self.weight[self.held :].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.first
        outside = (local < 0) | (local >= self.held)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden @ weight.T over the whole vocabulary on rank 0 (None elsewhere)."""
        if self.packed is not None:
            logits = cpu_linear.linear(hidden, self.packed)
        else:
            logits = hidden @ self.weight.t()
        return self.tp.gather_columns(logits, self.vocab_size)

    def checkpoint_slot(self, rest: str) -> Slot | None:
        if rest != "weight":
            return None
        return Slot("weight", slice(0, self.held), Narrow(0, self.first, self.held))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split by vocabulary rows like the embedding (and tied to it when tied)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.logits(hidden)


def pack_model(model: nn.Module) -> int:
    """Pack the weights of the model's CPU linear layers (Linear with `packable`) and of the layer its logits
    come from (`model.logits_layer()`) for glm_kernels/cpu_linear.py. A layer oneDNN refuses keeps F.linear.
    Returns how many were packed."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.packable]
    logits_layer = getattr(model, "logits_layer", None)
    if logits_layer is not None and logits_layer() is not None:
        layers.append(logits_layer())
    count = 0
    for layer in layers:
        weight = layer.weight
        if weight.device.type != "cpu" or weight.dim() != 2 or not cpu_linear.packs(weight.dtype):
            continue
        try:
            layer.packed = cpu_linear.pack(weight)
        except RuntimeError as exc:  # an op this build or CPU does not offer for the shape or dtype
            log.warning("oneDNN did not pack %s (%s); it keeps F.linear", tuple(weight.shape), exc)
            continue
        count += 1
    return count
