"""The attention backend interface: one object per kernel family that owns everything its kernels assume about
memory and the step.

A backend
  - allocates the paged KV cache in its own layout, per layer, from what the model needs (`LayerSpec`s: GQA
    key/value heads, or MLA's latent rows with DSA's indexer keys) - the layout is the backend's, a class
    attribute, so a cache can never be read in a layout its kernel does not use;
  - writes the new tokens' KV rows;
  - builds its metadata ONCE per step from the step (glm_kernels/metadata.py: StepMetadata), with whatever
    its kernels derive from it (block-table views, host lengths, masks), and every layer reuses it;
  - runs the attention forward: GQA, MLA over the latent cache, and DSA's top-k selection, which it returns
    as an index tensor [T, k] on the device (no host sync), which the MLA forward takes as it is.
Models get an `AttentionContext` (backend + the step's metadata) and call it; they never import a kernel.
Implementations: glm_kernels/reference.py, cpu_paged.py, triton_backend.py, ascend.py, cambricon.py, chosen by
name through glm_kernels/registry.py."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Generic, TypeVar

import torch

from glm_kernels import mla_reference
from glm_kernels.metadata import AttentionMetadata, StepMetadata, write_rows


class KvLayout(Enum):
    """Where a GQA cache keeps a block's rows: the value describes the tensor each of K and V is."""

    BLOCK_MAJOR = "[num_blocks, block_size, kv_heads, dim]"  # reference, cpu, triton, torch_npu's ATB ops
    HEAD_MAJOR = "[num_blocks, kv_heads, block_size, dim]"  # torch_mlu_ops' paged caches


class MlaLayout(Enum):
    """How an MLA cache keeps a token's latent row [c_kv | k_pe]."""

    JOINT = "one [num_blocks, block_size, kv_lora_rank + rope_dim] tensor"
    SPLIT = "c_kv [num_blocks, block_size, kv_lora_rank] and k_pe [num_blocks, block_size, rope_dim]"


@dataclass(frozen=True, slots=True)
class GqaSpec:
    """A GQA / MHA layer's cache: this rank's KV heads."""

    num_kv_heads: int
    head_dim: int
    v_head_dim: int

    def values_per_token(self) -> int:
        return self.num_kv_heads * (self.head_dim + self.v_head_dim)


@dataclass(frozen=True, slots=True)
class MlaSpec:
    """An MLA layer's cache: the normalized latent and the roped shared key per token; with DSA, the indexer's
    keys (index_dim 0: the layer has no indexer of its own)."""

    kv_lora_rank: int
    rope_dim: int
    index_dim: int = 0

    def values_per_token(self) -> int:
        return self.kv_lora_rank + self.rope_dim + self.index_dim


LayerSpec = GqaSpec | MlaSpec


def kv_bytes_per_token(specs: list[LayerSpec], dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes over all layers. Every layout holds the same values (none pads), so
    this does not depend on the backend; the planner's backends/model_dims.py counts the same."""
    return sum(spec.values_per_token() for spec in specs) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True, slots=True)
class GqaCache:
    key: torch.Tensor  # in the backend's KvLayout
    value: torch.Tensor


@dataclass(frozen=True, slots=True)
class MlaCache:
    c_kv: torch.Tensor  # [num_blocks, block_size, kv_lora_rank]
    k_pe: torch.Tensor  # [num_blocks, block_size, rope_dim]
    rows: torch.Tensor | None  # MlaLayout.JOINT: the [.., rank + rope] tensor c_kv and k_pe are views of
    index_keys: torch.Tensor | None  # DSA indexer keys [num_blocks, block_size, index_dim]; None: no indexer


LayerCache = GqaCache | MlaCache
M = TypeVar("M", bound=AttentionMetadata)


class AttentionBackend(ABC, Generic[M]):
    """See the module docstring. Subclasses set `name` and the layouts and implement build_metadata and the
    two forwards; the defaults write block-major / joint caches with index_copy_ and select DSA's top-k in
    plain torch."""

    name: ClassVar[str]
    kv_layout: ClassVar[KvLayout] = KvLayout.BLOCK_MAJOR
    mla_layout: ClassVar[MlaLayout] = MlaLayout.JOINT

    @classmethod
    def setup(cls, cache_dir: str | None) -> None:
        """Prepare the kernels (build, load) when the backend is chosen; `cache_dir` is the engine's."""

    # -- the KV cache ----------------------------------------------------------------------------------
    def allocate(
        self, specs: list[LayerSpec], num_blocks: int, block_size: int, dtype: torch.dtype, device
    ) -> list[LayerCache]:
        """One cache per layer, zeroed, in this backend's layouts."""
        return [self._allocate(spec, num_blocks, block_size, dtype, device) for spec in specs]

    def _allocate(self, spec: LayerSpec, num_blocks: int, block_size: int, dtype, device) -> LayerCache:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        if isinstance(spec, GqaSpec):
            pages = (num_blocks, block_size, spec.num_kv_heads)
            if self.kv_layout is KvLayout.HEAD_MAJOR:
                pages = (num_blocks, spec.num_kv_heads, block_size)
            return GqaCache(zeros(*pages, spec.head_dim), zeros(*pages, spec.v_head_dim))
        index_keys = zeros(num_blocks, block_size, spec.index_dim) if spec.index_dim else None
        if self.mla_layout is MlaLayout.SPLIT:
            c_kv = zeros(num_blocks, block_size, spec.kv_lora_rank)
            return MlaCache(c_kv, zeros(num_blocks, block_size, spec.rope_dim), None, index_keys)
        rows = zeros(num_blocks, block_size, spec.kv_lora_rank + spec.rope_dim)
        c_kv, k_pe = rows.split([spec.kv_lora_rank, spec.rope_dim], dim=-1)
        return MlaCache(c_kv, k_pe, rows, index_keys)

    def write_kv(self, cache: GqaCache, k: torch.Tensor, v: torch.Tensor, meta: M) -> None:
        """Store the new tokens' K and V ([T, kv_heads, dim]) in their slots."""
        write_rows(cache.key, k, meta.step.slot_mapping)
        write_rows(cache.value, v, meta.step.slot_mapping)

    def write_mla(self, cache: MlaCache, c_kv: torch.Tensor, k_pe: torch.Tensor, meta: M) -> None:
        """Store the new tokens' latent ([T, rank]) and roped key ([T, rope]) in their slots."""
        if cache.rows is not None:
            write_rows(cache.rows, torch.cat([c_kv, k_pe], dim=-1), meta.step.slot_mapping)
        else:
            write_rows(cache.c_kv, c_kv, meta.step.slot_mapping)
            write_rows(cache.k_pe, k_pe, meta.step.slot_mapping)

    # -- the forward -----------------------------------------------------------------------------------
    @abstractmethod
    def build_metadata(self, step: StepMetadata) -> M:
        """This backend's metadata for one step (glm_kernels/metadata.py: StepMetadata), shared by all layers."""

    @abstractmethod
    def gqa_attention(self, q: torch.Tensor, cache: GqaCache, meta: M, scale: float) -> torch.Tensor:
        """q [T, heads, dim] over the requests' cached K/V (the new rows already written): [T, heads, v_dim]."""

    @abstractmethod
    def mla_attention(
        self,
        q_latent: torch.Tensor,  # [T, heads, kv_lora_rank]: q_nope absorbed into the latent space
        q_pe: torch.Tensor,  # [T, heads, rope_dim]
        cache: MlaCache,
        meta: M,
        scale: float,
        topk_indices: torch.Tensor | None,  # [T, k] int32 key positions, -1 = padding; None: dense causal
    ) -> torch.Tensor:
        """The attended latent [T, heads, kv_lora_rank] (the new rows already written)."""

    def dsa_topk(
        self,
        q: torch.Tensor,  # [T, index_heads, index_dim] roped indexer queries
        head_weights: torch.Tensor,  # [T, index_heads]
        keys: torch.Tensor,  # [T, index_dim] the new tokens' indexer keys (written here first)
        cache: MlaCache,
        meta: M,
        index_topk: int,
        scale: float,
    ) -> torch.Tensor:
        """DSA: each query's index_topk best visible keys as [T, index_topk] int32 positions (-1 padding)."""
        assert cache.index_keys is not None, "a DSA top-k needs a layer with indexer keys"
        write_rows(cache.index_keys, keys, meta.step.slot_mapping)
        return mla_reference.dsa_topk(q, head_weights, cache.index_keys, meta, index_topk, scale)


@dataclass(frozen=True, slots=True)
class AttentionContext:
    """One step's attention as the model sees it: the backend and the metadata it built for the step."""

    backend: AttentionBackend
    meta: AttentionMetadata

    @classmethod
    def for_step(cls, backend: AttentionBackend, step: StepMetadata) -> AttentionContext:
        return cls(backend, backend.build_metadata(step))

    @property
    def positions(self) -> torch.Tensor:
        return self.meta.step.positions

    def gqa(self, q, k, v, cache: GqaCache, scale: float) -> torch.Tensor:
        """Write the new tokens' K/V, then attend: [T, heads, v_dim]."""
        self.backend.write_kv(cache, k, v, self.meta)
        return self.backend.gqa_attention(q, cache, self.meta, scale)

    def mla(
        self, q_latent, q_pe, c_kv, k_pe, cache: MlaCache, scale: float, topk_indices=None
    ) -> torch.Tensor:
        """Write the new tokens' latent rows, then attend (DSA: only to topk_indices): [T, heads, rank]."""
        self.backend.write_mla(cache, c_kv, k_pe, self.meta)
        return self.backend.mla_attention(q_latent, q_pe, cache, self.meta, scale, topk_indices)

    def dsa_topk(self, q, head_weights, keys, cache: MlaCache, index_topk: int, scale: float) -> torch.Tensor:
        return self.backend.dsa_topk(q, head_weights, keys, cache, self.meta, index_topk, scale)
