"""FAKE torch_npu for CPU tests - NOT Huawei code. Plain-torch implementations of the documented semantics of
the attention ops glm_kernels/ascend.py calls, with the documented argument constraints checked loudly:
  npu_fused_infer_attention_score  Ascend/op-plugin docs/context/torch_npu-npu_fused_infer_attention_score.md
                                   (only the paged BSND form, GQA and MLA with query_rope/key_rope)
  _npu_paged_attention             as called by vllm-ascend / sglang (ATB PagedAttention, decode)
  npu_sparse_flash_attention       Ascend ops-transformer attention/sparse_flash_attention/README.md
                                   (only layout_query TND with layout_kv PA_BSND)"""

from __future__ import annotations

import torch

from tests.fakes.common import attend, bottom_right_causal, gather_pages, require

HALF = (torch.float16, torch.bfloat16)
MASK_SIZE = 2048
calls: list[str] = []  # names of the ops called, for tests that check which path ran


def _check_mask(atten_mask: torch.Tensor | None) -> None:
    require(atten_mask is not None, "sparse_mode 3 needs the optimized atten_mask")
    require(
        tuple(atten_mask.shape) == (MASK_SIZE, MASK_SIZE), f"atten_mask must be 2048x2048: {atten_mask.shape}"
    )
    upper = torch.triu(torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool), diagonal=1)
    require(torch.equal(atten_mask.bool().cpu(), upper), "atten_mask must be the upper triangle (1 = masked)")


def npu_fused_infer_attention_score(
    query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
    block_table=None, query_rope=None, key_rope=None, num_heads=1, scale=1.0, pre_tokens=2147483647,
    next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0, sparse_mode=0, inner_precise=0,
    block_size=0, softmax_lse_flag=False,
):  # fmt: skip
    calls.append("npu_fused_infer_attention_score")
    require(input_layout == "BSND" and query.dim() == 4, "fake FIA implements input_layout BSND only")
    require(query.dtype in HALF and query.is_contiguous(), "query: contiguous float16/bfloat16")
    batch, q_s, heads, dim = query.shape
    require(heads == num_heads, f"num_heads {num_heads} != query N {heads}")
    kv_heads = num_key_value_heads or num_heads
    require(heads % kv_heads == 0 and heads // kv_heads <= 64, "num_heads / num_key_value_heads")
    require(pse_shift is None and not softmax_lse_flag, "fake FIA: no pse_shift, no softmax_lse")
    # page attention
    require(block_table is not None and block_table.dtype == torch.int32 and block_table.dim() == 2,
            "fake FIA implements page attention only: block_table int32 [B, max_blocks]")  # fmt: skip
    require(block_table.shape[0] == batch, "block_table's first dim must equal B")
    require(
        key.dim() == 3 and key.shape == value.shape, "BSND with paged KV: key/value (blocknum, blocksize, H)"
    )
    require(block_size == key.shape[1], f"block_size {block_size} != the caches' {key.shape[1]}")
    require(isinstance(actual_seq_lengths_kv, list) and len(actual_seq_lengths_kv) >= batch,
            "page attention needs actual_seq_lengths_kv, one int per batch")  # fmt: skip
    mla = query_rope is not None
    if mla:
        require(key_rope is not None and dim == 512 and query_rope.shape == (*query.shape[:3], 64),
                "MLA: query d 512, query_rope d 64")  # fmt: skip
        require(heads in (32, 64, 128) and kv_heads == 1 and key.shape[2] == 512, "MLA: N 32/64/128, KV N 1")
        require(block_size in (16, 128) and 1 <= q_s <= 16, "MLA: block_size 16/128, Q_S 1..16")
        require(key_rope.shape == (*key.shape[:2], 64), "key_rope (blocknum, blocksize, 64)")
        if q_s == 1:
            require(sparse_mode == 0 and atten_mask is None, "MLA with Q_S 1: sparse_mode 0, no mask")
    if q_s > 1:
        if not mla:
            require(
                block_size % 128 == 0 and 128 <= block_size <= 512, "Q_S>1 paged: block_size 128..512, x128"
            )
        require(sparse_mode == 3, "fake FIA implements sparse_mode 3 when Q_S > 1")
        _check_mask(atten_mask)
        require(isinstance(actual_seq_lengths, list) and len(actual_seq_lengths) >= batch,
                "actual_seq_lengths: one int per batch")  # fmt: skip
    else:
        require(block_size % 16 == 0, "Q_S 1 paged: block_size 16-aligned")
        require(sparse_mode == 0 and atten_mask is None, "fake FIA with Q_S 1: no mask")

    v_dim = value.shape[2] // kv_heads
    out = torch.zeros(batch, q_s, heads, v_dim, dtype=query.dtype)
    keys_all = key.view(key.shape[0], block_size, kv_heads, -1)
    values_all = value.view(value.shape[0], block_size, kv_heads, -1)
    for b in range(batch):
        kv_len = actual_seq_lengths_kv[b]
        q_len = 1 if q_s == 1 else actual_seq_lengths[b]
        require(0 < q_len <= q_s and kv_len >= q_len, f"batch {b}: q_len {q_len}, kv_len {kv_len}")
        keys = gather_pages(keys_all, block_table[b], kv_len, block_size)
        values = gather_pages(values_all, block_table[b], kv_len, block_size)
        q = query[b, :q_len]
        if mla:
            keys = torch.cat(
                [keys, gather_pages(key_rope[:, :, None], block_table[b], kv_len, block_size)], -1
            )
            q = torch.cat([q, query_rope[b, :q_len]], -1)
        allowed = bottom_right_causal(q_len, kv_len) if q_s > 1 else torch.ones(1, kv_len, dtype=torch.bool)
        out[b, :q_len] = attend(q, keys, values, scale, allowed).to(query.dtype)
    return out, torch.zeros(1)


def _npu_paged_attention(
    query, key_cache, value_cache, num_kv_heads, num_heads, scale_value, block_table, context_lens, out
):
    calls.append("_npu_paged_attention")
    require(query.dim() == 3 and query.shape[1] == num_heads, "query [B, num_heads, D]")
    require(query.dtype in HALF, "query float16/bfloat16")
    require(key_cache.dim() == 4 and key_cache.shape[2] == num_kv_heads,
            "key_cache [num_blocks, block_size, num_kv_heads, D]")  # fmt: skip
    require(
        value_cache.shape[:3] == key_cache.shape[:3], "value_cache [num_blocks, block_size, kv_heads, Dv]"
    )
    batch, block_size = query.shape[0], key_cache.shape[1]
    require(block_table.dtype == torch.int32 and block_table.shape[0] == batch, "block_table int32 [B, n]")
    require(context_lens.device.type == "cpu" and context_lens.dtype == torch.int32
            and tuple(context_lens.shape) == (batch,), "context_lens: int32 [B] host tensor")  # fmt: skip
    require(tuple(out.shape) == (batch, num_heads, value_cache.shape[-1]), "out [B, num_heads, Dv]")
    for b in range(batch):
        length = int(context_lens[b])
        keys = gather_pages(key_cache, block_table[b], length, block_size)
        values = gather_pages(value_cache, block_table[b], length, block_size)
        allowed = torch.ones(1, length, dtype=torch.bool)
        out[b] = attend(query[b : b + 1], keys, values, scale_value, allowed)[0].to(out.dtype)


def npu_sparse_flash_attention(
    query, key, value, sparse_indices, scale_value, sparse_block_size, *, block_table=None,
    actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None, key_rope=None,
    layout_query="BSND", layout_kv="BSND", sparse_mode=3,
):  # fmt: skip
    calls.append("npu_sparse_flash_attention")
    require(layout_query == "TND" and layout_kv == "PA_BSND", "fake SFA implements TND with PA_BSND")
    tokens, heads, dim = query.shape
    require(
        query.dtype in HALF and heads in (1, 2, 4, 8, 16, 32, 64, 128) and dim == 512, "query [T, N, 512]"
    )
    require(key.dim() == 4 and key.shape[2] == 1 and key.shape[3] == 512 and value.shape == key.shape,
            "key/value PA_BSND [block_num, block_size, 1, 512]")  # fmt: skip
    block_size = key.shape[1]
    require(block_size % 16 == 0 and block_size <= 1024, "block_size: a multiple of 16, at most 1024")
    require(block_size % sparse_block_size == 0, "sparse_block_size must divide block_size")
    require(query_rope is not None and query_rope.shape == (tokens, heads, 64), "query_rope [T, N, 64]")
    require(key_rope is not None and key_rope.shape == (*key.shape[:3], 64), "key_rope [nb, bs, 1, 64]")
    require(sparse_indices.dtype == torch.int32 and sparse_indices.dim() == 3 and sparse_indices.shape[:2]
            == (tokens, 1) and sparse_indices.is_contiguous(), "sparse_indices int32 [T, KV_N, k]")  # fmt: skip
    invalid = sparse_indices[:, 0] < 0
    require(bool((invalid[:, :-1] <= invalid[:, 1:]).all()), "sparse_indices: valid entries first")
    cum = actual_seq_lengths_query
    require(cum is not None and cum.dtype == torch.int32 and int(cum[-1]) == tokens
            and bool((cum[1:] >= cum[:-1]).all()), "TND: actual_seq_lengths_query cumulative int32")  # fmt: skip
    kv_lens = actual_seq_lengths_kv
    require(kv_lens is not None and kv_lens.dtype == torch.int32 and kv_lens.shape == cum.shape,
            "actual_seq_lengths_kv int32 [B]")  # fmt: skip
    require(block_table is not None and block_table.dtype == torch.int32 and block_table.shape[0] == len(cum),
            "block_table int32 [B, n]")  # fmt: skip
    require(sparse_mode in (0, 3), "sparse_mode 0 or 3")
    out = torch.zeros(tokens, heads, 512, dtype=query.dtype)
    rows = torch.cat([key, key_rope], -1)
    start = 0
    for b, end in enumerate(cum.tolist()):
        kv_len = int(kv_lens[b])
        context = gather_pages(rows, block_table[b], kv_len, block_size)  # [kv_len, 1, 576]
        for t in range(start, end):
            chosen = []
            for idx in sparse_indices[t, 0].tolist():
                if idx < 0:
                    break
                chosen.extend(range(idx * sparse_block_size, min((idx + 1) * sparse_block_size, kv_len)))
            limit = kv_len - (end - start) + (t - start) if sparse_mode == 3 else kv_len - 1
            picked = torch.tensor(sorted({j for j in chosen if j <= limit}), dtype=torch.long)
            q = torch.cat([query[t], query_rope[t]], -1)[None]
            keys = context[picked]
            allowed = torch.ones(1, len(picked), dtype=torch.bool)
            out[t] = attend(q, keys, keys[..., :512], scale_value, allowed)[0].to(query.dtype)
        start = end
    return out
