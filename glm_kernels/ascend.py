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

import torch

from glm_kernels.reference import AttentionMetadata, AttnGroup

log = logging.getLogger(__name__)

MASK_SIZE = 2048  # FIA's "optimized" causal mask for sparse_mode 2/3/4 is always 2048 x 2048
MLA_MAX_QUERIES = 16  # FIA with query_rope accepts S of 1..16
PREFILL_BLOCK_SIZES = (128, 256, 384, 512)  # paged FIA with S > 1
MLA_BLOCK_SIZES = (16, 128)  # paged FIA with query_rope (ND caches)

LatentCache = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _torch_npu() -> ModuleType:
    import torch_npu

    return torch_npu


@dataclass(frozen=True, slots=True)
class HostGroup:
    """An AttnGroup's lengths on the host (the ops take them as ints) and its int32 block tables."""

    first_tokens: list[int]
    q_lens: list[int]
    seq_lens: list[int]
    block_tables: torch.Tensor  # [S, max_blocks] int32, on the device


def host_group(group: AttnGroup) -> HostGroup:
    s = group.token_index.shape[0]
    lengths = torch.stack(
        [group.token_index[:, 0], group.valid.sum(1), group.kv_mask.reshape(s, -1).sum(1)]
    ).tolist()  # one device-to-host copy per group and step
    return HostGroup(*lengths, block_tables=group.block_tables.to(torch.int32))


_last_step: tuple[AttentionMetadata | None, list[HostGroup]] = (None, [])


def host_groups(meta: AttentionMetadata) -> list[HostGroup]:
    global _last_step
    if _last_step[0] is not meta:
        _last_step = (meta, [host_group(g) for g in meta.groups])
    return _last_step[1]


_masks: dict[torch.device, torch.Tensor] = {}


def causal_mask(device: torch.device) -> torch.Tensor:
    if device not in _masks:
        ones = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=device)
        _masks[device] = torch.triu(ones, diagonal=1)
    return _masks[device]


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
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Drop-in for glm_kernels.reference.paged_attention on an NPU. Returns [T, heads, v_dim]."""
    npu = _torch_npu()
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    for group, host in zip(meta.groups, host_groups(meta), strict=True):
        if group.mask is None:
            _decode(npu, q, k_cache, v_cache, out, group, host, scale)
        else:
            _prefill(npu, q, k_cache, v_cache, out, group, host, scale)
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
        context_lens=torch.tensor(host.seq_lens, dtype=torch.int32),  # host tensor, as the op requires
        out=result,
    )
    out[rows] = result


def _prefill(npu, q, k_cache, v_cache, out, group: AttnGroup, host: HostGroup, scale: float) -> None:
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    _require_block_size(block_size, PREFILL_BLOCK_SIZES, "Prefill with a paged KV cache")
    result, _ = npu.npu_fused_infer_attention_score(
        q[group.token_index],  # [S, max_q, heads, D], padding rows repeat a real row
        k_cache.view(num_blocks, block_size, -1),
        v_cache.view(num_blocks, block_size, -1),
        atten_mask=causal_mask(q.device),
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


# -- MLA over the latent cache -------------------------------------------------------------------------
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def split_latent(latent_cache: LatentCache, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_kv [nb, bs, rank], k_pe [nb, bs, rope]). A joint [nb, bs, rank + rope] cache is copied apart on
    every call - correct but slow; an Ascend runner should allocate the two caches separately."""
    if isinstance(latent_cache, tuple):
        return latent_cache
    _warn_once(
        "joint", "ascend MLA got a joint latent cache: copying it apart each call (allocate c_kv/k_pe)"
    )
    return latent_cache[..., :rank].contiguous(), latent_cache[..., rank:].contiguous()


def mla_paged_attention(
    q_nope: torch.Tensor,  # [T, heads, kv_lora_rank]
    q_pe: torch.Tensor,  # [T, heads, rope_dim]
    latent_cache: LatentCache,  # (c_kv, k_pe) caches, or one joint [nb, bs, rank + rope] cache
    meta: AttentionMetadata,
    scale: float,
    topk_indices: torch.Tensor | None = None,  # [T, k] key positions, -1 = padding
) -> torch.Tensor:
    """glm_kernels.triton_mla's semantics on an NPU. Returns [T, heads, kv_lora_rank]."""
    npu = _torch_npu()
    rank = q_nope.shape[-1]
    c_kv, k_pe = split_latent(latent_cache, rank)
    if topk_indices is not None:
        return _mla_sparse(npu, q_nope, q_pe, c_kv, k_pe, meta, scale, topk_indices)
    _require_block_size(c_kv.shape[1], MLA_BLOCK_SIZES, "MLA with a paged latent cache")
    out = q_nope.new_empty(q_nope.shape)
    for group, host in zip(meta.groups, host_groups(meta), strict=True):
        if group.mask is None:
            rows = group.flat_out_index
            result = _fia_mla(npu, q_nope[rows][:, None], q_pe[rows][:, None], c_kv, k_pe, scale,
                              host.block_tables, None, host.seq_lens)  # fmt: skip
            out[rows] = result[:, 0]
        else:
            _mla_prefill(npu, q_nope, q_pe, c_kv, k_pe, out, host, scale)
    return out


def _fia_mla(npu, query, query_rope, c_kv, k_pe, scale, block_table, q_lens, kv_lens) -> torch.Tensor:
    num_blocks, block_size = c_kv.shape[:2]
    many = query.shape[1] > 1
    result, _ = npu.npu_fused_infer_attention_score(
        query,  # [B, S, heads, rank]
        c_kv.view(num_blocks, block_size, -1),
        c_kv.view(num_blocks, block_size, -1),
        query_rope=query_rope,
        key_rope=k_pe.view(num_blocks, block_size, -1),
        atten_mask=causal_mask(query.device) if many else None,
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


def _mla_prefill(npu, q_nope, q_pe, c_kv, k_pe, out, host: HostGroup, scale: float) -> None:
    """Chunks as pieces of <= 16 queries: piece [a, a + n) of a request sees keys < context + a + n."""
    rows, piece_lens, kv_lens, tables = [], [], [], []
    for s, (first, q_len, seq_len) in enumerate(
        zip(host.first_tokens, host.q_lens, host.seq_lens, strict=True)
    ):
        for a in range(0, q_len, MLA_MAX_QUERIES):
            n = min(MLA_MAX_QUERIES, q_len - a)
            rows.append([first + a + min(i, n - 1) for i in range(MLA_MAX_QUERIES)])
            piece_lens.append(n)
            kv_lens.append(seq_len - q_len + a + n)
            tables.append(s)
    index = torch.tensor(rows, device=q_nope.device)  # [P, 16], padding repeats the piece's last row
    table = host.block_tables[torch.tensor(tables, device=q_nope.device)]
    result = _fia_mla(npu, q_nope[index], q_pe[index], c_kv, k_pe, scale, table, piece_lens, kv_lens)
    valid = torch.arange(MLA_MAX_QUERIES)[None, :] < torch.tensor(piece_lens)[:, None]
    out[index[valid.to(index.device)]] = result[valid.to(result.device)]


def _sparse_op(npu):
    op = getattr(npu, "npu_sparse_flash_attention", None)
    if op is None:
        op = getattr(getattr(torch.ops, "custom", None), "npu_sparse_flash_attention", None)
    return op


def _mla_sparse(npu, q_nope, q_pe, c_kv, k_pe, meta, scale, topk_indices) -> torch.Tensor:
    op = _sparse_op(npu)
    if op is None:
        from glm_kernels.dsa_topk import reference_mla_attention

        _warn_once("sparse", "npu_sparse_flash_attention not found: DSA top-k runs on the torch reference")
        return reference_mla_attention(q_nope, q_pe, torch.cat([c_kv, k_pe], -1), meta, scale, topk_indices)
    num_blocks, block_size = c_kv.shape[:2]
    out = q_nope.new_empty(q_nope.shape)
    for group, host in zip(meta.groups, host_groups(meta), strict=True):
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
            actual_seq_lengths_query=group.valid.sum(1).cumsum(0).to(torch.int32),
            actual_seq_lengths_kv=torch.tensor(host.seq_lens, dtype=torch.int32, device=q_nope.device),
            query_rope=q_pe[rows].contiguous(),
            key_rope=k_pe.view(num_blocks, block_size, 1, -1),
            layout_query="TND",
            layout_kv="PA_BSND",
            sparse_mode=3,
        )
    return out
