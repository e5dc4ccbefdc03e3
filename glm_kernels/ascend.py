"""Attention on Huawei Ascend (910B/A2, A3) through torch_npu's fused inference ops; torch_npu is imported on
the first call, never at import.

The ops, the layouts and lengths we pass (sources: Ascend/op-plugin docs/context/
torch_npu-npu_fused_infer_attention_score.md; Ascend ops-transformer attention/sparse_flash_attention/README.md;
the _npu_paged_attention calls of vllm-ascend vllm_ascend/attention/attention_v1.py and of sglang
python/sglang/srt/hardware_backend/npu/attention/ascend_backend.py, whose keyword names we use):

torch_npu._npu_paged_attention (ATB PagedAttention), decode tokens:
    query [B, heads, D]; key_cache / value_cache [num_blocks, block_size, kv_heads, D] (our layout as is);
    num_kv_heads, num_heads, scale_value; block_table int32 [B, >= blocks of the longest context];
    context_lens int32 [B] ON THE HOST = context length including the new token; out [B, heads, Dv] (in place).
torch_npu.npu_fused_infer_attention_score (FIA), prefill chunks over the paged prefix:
    input_layout "BSND": query [B, S = longest chunk, heads, D], right-padded; paged K/V must then be
    (blocknum, blocksize, H): the caches viewed [num_blocks, block_size, kv_heads * D]; block_table int32
    [B, >= max blocks]; actual_seq_lengths = per-request new tokens and actual_seq_lengths_kv = per-request
    context incl. the new tokens (host ints, per request - only TND takes cumulative sums); sparse_mode 3 =
    rightDownCausal (row i of a request sees keys <= kv_len - q_len + i, our causal rule) with atten_mask the
    "optimized" 2048 x 2048 bool upper triangle (True = masked); block_size must be 128..512, a multiple of
    128, when S > 1 (16-aligned, 128 recommended, when S == 1). Returns (out [B, S, heads, Dv], lse).
    Keyword `scale` is the op-plugin 6.0+/master name (older torch_npu called it scale_value).
FIA MLA (GLM-4.7-Flash, GLM-5): query = q_nope absorbed [B, S, heads, 512], query_rope [B, S, heads, 64];
    key = value = the c_kv cache [num_blocks, block_size, 512] and key_rope the k_pe cache
    [num_blocks, block_size, 64] (separate tensors: the ops take no strided view of one latent row, and
    npu_mla_prolog writes the two caches separately); num_key_value_heads 1; heads 32/64/128; block_size
    16 or 128; S of 1..16 only, so longer chunks go as pieces of 16 queries (each piece its own kv length,
    which rightDownCausal makes exact); sparse_mode 0 without mask when S == 1, 3 with the mask when S > 1.
npu_sparse_flash_attention (GLM-5 DSA top-k; torch_npu.npu_sparse_flash_attention where this torch_npu has
    it, else torch.ops.custom from Ascend's custom-ops package): layout_query "TND": query [T, heads, 512],
    query_rope [T, heads, 64]; layout_kv "PA_BSND": key = value = c_kv [num_blocks, block_size, 1, 512],
    key_rope [num_blocks, block_size, 1, 64]; sparse_indices int32 [T, 1, k], valid entries first;
    sparse_block_size 1 (indices are token positions); actual_seq_lengths_query = CUMULATIVE new tokens
    (TND), actual_seq_lengths_kv per-request lengths, both int32 device tensors; sparse_mode 3.
    Without the op the top-k path falls back to the plain-torch reference (logged once).
Not used: npu_incre_flash_attention (the S == 1 branch of FIA, older API); npu_mla_prolog(_v2/_v3) fuses the
MLA down-projections, RoPE and cache writes - a model-side op, not attention.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from glm_kernels import mla_reference
from glm_kernels.backend import AttentionBackend, GqaCache, MlaCache, MlaLayout
from glm_kernels.metadata import AttentionMetadata, AttnGroup, StepMetadata, group_step

log = logging.getLogger(__name__)

MASK_SIZE = 2048  # FIA's "optimized" causal mask for sparse_mode 2/3/4 is always 2048 x 2048
MLA_MAX_QUERIES = 16  # FIA with query_rope accepts S of 1..16
PREFILL_BLOCK_SIZES = (128, 256, 384, 512)  # paged FIA with S > 1
MLA_BLOCK_SIZES = (16, 128)  # paged FIA with query_rope (ND caches)


def _torch_npu() -> ModuleType:
    import torch_npu

    return torch_npu


@dataclass(frozen=True, slots=True)
class MlaPieces:
    """A prefill group's chunks as pieces of <= 16 queries (FIA-MLA's limit): piece [a, a + n) of a request
    sees keys < context + a + n."""

    index: torch.Tensor  # [P, 16] rows of the flattened tokens, padding repeats the piece's last row
    block_tables: torch.Tensor  # [P, max_blocks] int32: each piece's request's table
    lens: list[int]  # queries per piece
    kv_lens: list[int]
    valid: torch.Tensor  # [P, 16] bool


@dataclass(frozen=True, slots=True)
class HostGroup:
    """A group's lengths as the ops take them: host ints, a host tensor, device tensors; all built once a step."""

    first_tokens: list[int]
    q_lens: list[int]
    seq_lens: list[int]
    seq_lens_cpu: torch.Tensor  # [S] int32 on the host (_npu_paged_attention's context_lens)
    seq_lens_device: torch.Tensor  # [S] int32
    cum_q_lens: torch.Tensor  # [S] int32 cumulative new tokens (TND's actual_seq_lengths_query)
    block_tables: torch.Tensor  # [S, max_blocks] int32, on the device
    pieces: MlaPieces | None  # prefill groups


@dataclass(frozen=True, slots=True)
class AscendMetadata(AttentionMetadata):
    host: list[HostGroup]  # one per group
    mask: torch.Tensor  # FIA's 2048 x 2048 "optimized" causal mask (True = masked), made once per device


def build_ascend_metadata(step: StepMetadata, mask: torch.Tensor) -> AscendMetadata:
    groups = group_step(step)
    return AscendMetadata(step, groups, [host_group(step, g) for g in groups], mask)


def host_group(step: StepMetadata, group: AttnGroup) -> HostGroup:
    q_lens = [step.query_lens[i] for i in group.requests]
    seq_lens = [step.seq_lens_host[i] for i in group.requests]
    first = [step.query_start_host[i] for i in group.requests]
    device = step.device
    tables = group.block_tables.to(torch.int32)
    cum = torch.tensor(q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return HostGroup(
        first, q_lens, seq_lens,
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
        seq_lens_device=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cum_q_lens=cum.to(device),
        block_tables=tables,
        pieces=None if group.is_decode else mla_pieces(first, q_lens, seq_lens, tables),
    )  # fmt: skip


def mla_pieces(first: list[int], q_lens: list[int], seq_lens: list[int], tables: torch.Tensor) -> MlaPieces:
    rows, piece_lens, kv_lens, owners = [], [], [], []
    for s, (f, q_len, seq_len) in enumerate(zip(first, q_lens, seq_lens, strict=True)):
        for a in range(0, q_len, MLA_MAX_QUERIES):
            n = min(MLA_MAX_QUERIES, q_len - a)
            rows.append([f + a + min(i, n - 1) for i in range(MLA_MAX_QUERIES)])
            piece_lens.append(n)
            kv_lens.append(seq_len - q_len + a + n)
            owners.append(s)
    valid = torch.arange(MLA_MAX_QUERIES)[None, :] < torch.tensor(piece_lens)[:, None]
    device = tables.device
    return MlaPieces(
        index=torch.tensor(rows, device=device),
        block_tables=tables[torch.tensor(owners, device=device)],
        lens=piece_lens,
        kv_lens=kv_lens,
        valid=valid.to(device),
    )


def causal_mask(device: torch.device) -> torch.Tensor:
    return torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=device), diagonal=1)


def _require_block_size(block_size: int, allowed: tuple[int, ...], what: str) -> None:
    if block_size not in allowed:
        raise ValueError(
            f"{what} on Ascend needs engine.block_size in {allowed} (npu_fused_infer_attention_score's "
            f"paged-attention constraint), got {block_size}"
        )


# -- GQA / MHA ---------------------------------------------------------------------------------------
def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, v_dim]
    meta: AscendMetadata,
    scale: float,
) -> torch.Tensor:
    """Drop-in for glm_kernels.reference.paged_attention on an NPU. Returns [T, heads, v_dim]."""
    npu = _torch_npu()
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for group, host in zip(meta.groups, meta.host, strict=True):
        if group.is_decode:
            _decode(npu, q, k_cache, v_cache, out, group, host, scale)
        else:
            _prefill(npu, q, k_cache, v_cache, out, group, host, meta.mask, scale)
    return out


def _decode(npu, q, k_cache, v_cache, out, group: AttnGroup, host: HostGroup, scale: float) -> None:
    rows = group.flat_out_index
    result = q.new_empty(rows.shape[0], q.shape[1], v_cache.shape[-1])
    npu._npu_paged_attention(
        query=q[rows].contiguous(),
        key_cache=k_cache,
        value_cache=v_cache,
        num_kv_heads=k_cache.shape[2],
        num_heads=q.shape[1],
        scale_value=scale,
        block_table=host.block_tables,
        context_lens=host.seq_lens_cpu,  # host tensor, as the op requires
        out=result,
    )
    out[rows] = result


def _prefill(npu, q, k_cache, v_cache, out, group: AttnGroup, host: HostGroup, mask, scale: float) -> None:
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    _require_block_size(block_size, PREFILL_BLOCK_SIZES, "Prefill with a paged KV cache")
    result, _ = npu.npu_fused_infer_attention_score(
        q[group.token_index],  # [S, max_q, heads, D], padding rows repeat a real row
        k_cache.view(num_blocks, block_size, -1),
        v_cache.view(num_blocks, block_size, -1),
        atten_mask=mask,
        actual_seq_lengths=host.q_lens,
        actual_seq_lengths_kv=host.seq_lens,
        block_table=host.block_tables,
        num_heads=q.shape[1],
        num_key_value_heads=kv_heads,
        scale=scale,
        input_layout="BSND",
        sparse_mode=3,
        block_size=block_size,
    )
    out[group.flat_out_index] = result[group.valid]


# -- MLA over the split latent cache -------------------------------------------------------------------
def mla_paged_attention(
    q_nope: torch.Tensor,  # [T, heads, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    c_kv: torch.Tensor,  # [num_blocks, block_size, kv_lora_rank]
    k_pe: torch.Tensor,  # [num_blocks, block_size, rope_dim]
    meta: AscendMetadata,
    scale: float,
    topk_indices: torch.Tensor | None = None,  # [T, k] key positions, -1 = padding
) -> torch.Tensor:
    """glm_kernels.triton_mla's semantics on an NPU. Returns [T, heads, kv_lora_rank]."""
    npu = _torch_npu()
    if topk_indices is not None:
        return _mla_sparse(npu, q_nope, q_pe, c_kv, k_pe, meta, scale, topk_indices)
    _require_block_size(c_kv.shape[1], MLA_BLOCK_SIZES, "MLA with a paged latent cache")
    out = q_nope.new_empty(q_nope.shape)
    for group, host in zip(meta.groups, meta.host, strict=True):
        if group.is_decode:
            rows = group.flat_out_index
            result = _fia_mla(npu, q_nope[rows][:, None], q_pe[rows][:, None], c_kv, k_pe, scale,
                              host.block_tables, None, host.seq_lens, None)  # fmt: skip
            out[rows] = result[:, 0]
        else:
            pieces = host.pieces
            result = _fia_mla(npu, q_nope[pieces.index], q_pe[pieces.index], c_kv, k_pe, scale,
                              pieces.block_tables, pieces.lens, pieces.kv_lens, meta.mask)  # fmt: skip
            out[pieces.index[pieces.valid]] = result[pieces.valid]
    return out


def _fia_mla(npu, query, query_rope, c_kv, k_pe, scale, block_table, q_lens, kv_lens, mask) -> torch.Tensor:
    num_blocks, block_size = c_kv.shape[:2]
    many = query.shape[1] > 1
    result, _ = npu.npu_fused_infer_attention_score(
        query,  # [B, S, heads, rank]
        c_kv.view(num_blocks, block_size, -1),
        c_kv.view(num_blocks, block_size, -1),
        query_rope=query_rope,
        key_rope=k_pe.view(num_blocks, block_size, -1),
        atten_mask=mask if many else None,
        actual_seq_lengths=q_lens,
        actual_seq_lengths_kv=kv_lens,
        block_table=block_table,
        num_heads=query.shape[2],
        num_key_value_heads=1,
        scale=scale,
        input_layout="BSND",
        sparse_mode=3 if many else 0,
        block_size=block_size,
    )
    return result


def _sparse_op(npu):
    op = getattr(npu, "npu_sparse_flash_attention", None)
    if op is None:
        op = getattr(getattr(torch.ops, "custom", None), "npu_sparse_flash_attention", None)
    return op


_warned: set[str] = set()


def _mla_sparse(npu, q_nope, q_pe, c_kv, k_pe, meta: AscendMetadata, scale, topk_indices) -> torch.Tensor:
    op = _sparse_op(npu)
    if op is None:
        if "sparse" not in _warned:
            _warned.add("sparse")
            log.warning("npu_sparse_flash_attention not found: DSA top-k runs on the torch reference")
        rows = torch.cat([c_kv, k_pe], -1)
        return mla_reference.mla_paged_attention(q_nope, q_pe, rows, meta, scale, topk_indices)
    num_blocks, block_size = c_kv.shape[:2]
    out = q_nope.new_empty(q_nope.shape)
    for group, host in zip(meta.groups, meta.host, strict=True):
        rows = group.flat_out_index  # request-major: TND order
        idx = topk_indices[rows]
        padding_last = torch.sort((idx < 0).to(torch.int8), dim=1, stable=True).indices
        idx = torch.gather(idx, 1, padding_last).to(torch.int32)
        out[rows] = op(
            query=q_nope[rows].contiguous(),
            key=c_kv.view(num_blocks, block_size, 1, -1),
            value=c_kv.view(num_blocks, block_size, 1, -1),
            sparse_indices=idx[:, None, :].contiguous(),
            scale_value=scale,
            sparse_block_size=1,
            block_table=host.block_tables,
            actual_seq_lengths_query=host.cum_q_lens,
            actual_seq_lengths_kv=host.seq_lens_device,
            query_rope=q_pe[rows].contiguous(),
            key_rope=k_pe.view(num_blocks, block_size, 1, -1),
            layout_query="TND",
            layout_kv="PA_BSND",
            sparse_mode=3,
        )
    return out


class AscendBackend(AttentionBackend[AscendMetadata]):
    """Block-major GQA caches (ATB's and FIA's paged layout as is); MLA split into c_kv and k_pe caches, as
    FIA and the sparse op take them (and npu_mla_prolog writes them)."""

    name: ClassVar[str] = "ascend"
    mla_layout: ClassVar[MlaLayout] = MlaLayout.SPLIT

    def __init__(self) -> None:
        self._masks: dict[torch.device, torch.Tensor] = {}

    def build_metadata(self, step: StepMetadata) -> AscendMetadata:
        if step.device not in self._masks:
            self._masks[step.device] = causal_mask(step.device)
        return build_ascend_metadata(step, self._masks[step.device])

    def gqa_attention(self, q, cache: GqaCache, meta: AscendMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, cache.key, cache.value, meta, scale)

    def mla_attention(self, q_latent, q_pe, cache: MlaCache, meta, scale, topk_indices) -> torch.Tensor:
        return mla_paged_attention(q_latent, q_pe, cache.c_kv, cache.k_pe, meta, scale, topk_indices)
