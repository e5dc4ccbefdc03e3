"""Paged MLA over the latent cache and the DSA top-k selection against dense per-request attention with the
keys and values expanded by kv_b_proj (the textbook formulation), on a mixed decode / prefill-chunk batch."""

import pytest
import torch

from glm_kernels.metadata import build_metadata, write_rows
from glm_kernels.mla_reference import dsa_topk, mla_paged_attention

HEADS, NOPE, ROPE, V, RANK = 4, 12, 8, 10, 16
INDEX_HEADS, INDEX_DIM = 8, 8
BLOCK = 4
STARTS = [0, 5, 20, 0, 33, 9]
QUERY_LENS = [7, 1, 1, 12, 4, 1]  # prefill chunks (some after earlier chunks) and decode tokens


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [s + q for s, q in zip(STARTS, QUERY_LENS, strict=True)]
    num_blocks = sum((n + BLOCK - 1) // BLOCK for n in seq_lens) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in seq_lens:
        k = (n + BLOCK - 1) // BLOCK
        tables.append(perm[used : used + k])
        used += k
    rows = [torch.randn(n, RANK + ROPE, generator=g) for n in seq_lens]  # [latent | k_pe] of each context
    index_keys = [torch.randn(n, INDEX_DIM, generator=g) for n in seq_lens]
    cache = torch.zeros(num_blocks, BLOCK, RANK + ROPE)
    key_cache = torch.zeros(num_blocks, BLOCK, INDEX_DIM)
    for table, start, r, k in zip(tables, STARTS, rows, index_keys, strict=True):
        for pos in range(start):  # context computed by earlier steps
            cache[table[pos // BLOCK], pos % BLOCK] = r[pos]
            key_cache[table[pos // BLOCK], pos % BLOCK] = k[pos]
    meta = build_metadata(STARTS, QUERY_LENS, tables, BLOCK)
    new = lambda xs: torch.cat([x[s : s + q] for x, s, q in zip(xs, STARTS, QUERY_LENS, strict=True)])  # noqa: E731
    write_rows(cache, new(rows), meta.step.slot_mapping)
    write_rows(key_cache, new(index_keys), meta.step.slot_mapping)
    t = sum(QUERY_LENS)
    queries = {
        "nope": torch.randn(t, HEADS, NOPE, generator=g),
        "pe": torch.randn(t, HEADS, ROPE, generator=g),
        "index_q": torch.randn(t, INDEX_HEADS, INDEX_DIM, generator=g),
        "index_w": torch.rand(t, INDEX_HEADS, generator=g) + 0.1,  # ties (at 0) need all heads < 0
    }
    w_kv = torch.randn(HEADS, NOPE + V, RANK, generator=g) * 0.3
    return meta, cache, key_cache, rows, index_keys, queries, w_kv


def _dense(rows, index_keys, queries, w_kv, scale, topk):
    """Per request and query row: expanded keys/values, causal, optionally only the top-k keys by index score."""
    w_uk, w_uv = w_kv.split([NOPE, V], dim=1)
    outs, kept, t = [], [], 0
    for r, keys, start, q_len in zip(rows, index_keys, STARTS, QUERY_LENS, strict=True):
        latent, k_pe = r.split([RANK, ROPE], dim=-1)
        k = torch.cat([torch.einsum("lr,hdr->lhd", latent, w_uk), k_pe[:, None].expand(-1, HEADS, -1)], -1)
        v = torch.einsum("lr,hvr->lhv", latent, w_uv)
        for i in range(q_len):
            pos = start + i
            q = torch.cat([queries["nope"][t], queries["pe"][t]], dim=-1)  # [H, NOPE + ROPE]
            visible = torch.arange(pos + 1)
            if topk is not None:
                per_head = torch.relu(queries["index_q"][t] @ keys[: pos + 1].T * INDEX_DIM**-0.5)
                index_scores = queries["index_w"][t] @ per_head
                visible = index_scores.topk(min(topk, pos + 1)).indices.sort().values
            kept.append(len(visible))
            scores = torch.einsum("hd,lhd->hl", q, k[visible]) * scale
            outs.append(torch.einsum("hl,lhv->hv", scores.softmax(-1), v[visible]))
            t += 1
    return torch.stack(outs), kept


def _mla(meta, cache, queries, w_kv, scale, topk_indices=None):
    w_uk, w_uv = w_kv.split([NOPE, V], dim=1)
    q_latent = torch.einsum("thd,hdr->thr", queries["nope"], w_uk)
    o_latent = mla_paged_attention(q_latent, queries["pe"], cache, meta, scale, topk_indices)
    return torch.einsum("thr,hvr->thv", o_latent, w_uv)


def test_dense_mla_matches_expanded_attention():
    meta, cache, _, rows, keys, queries, w_kv = _batch()
    scale = (NOPE + ROPE) ** -0.5
    expected, _ = _dense(rows, keys, queries, w_kv, scale, topk=None)
    torch.testing.assert_close(_mla(meta, cache, queries, w_kv, scale), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 5, 16])
def test_sparse_mla_attends_to_each_querys_topk_keys(topk):
    meta, cache, key_cache, rows, keys, queries, w_kv = _batch(seed=topk)
    scale = (NOPE + ROPE) ** -0.5
    expected, kept = _dense(rows, keys, queries, w_kv, scale, topk=topk)
    indices = dsa_topk(queries["index_q"], queries["index_w"], key_cache, meta, topk, INDEX_DIM**-0.5)
    assert indices.shape == (meta.step.num_tokens, topk) and indices.dtype == torch.int32
    assert (indices >= 0).sum(-1).tolist() == kept  # min(topk, visible keys) per query, -1 for the rest
    assert max(kept) == topk  # the longer contexts really are cut down
    got = _mla(meta, cache, queries, w_kv, scale, indices)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_topk_at_least_the_context_is_dense():
    meta, cache, key_cache, _, _, queries, w_kv = _batch(seed=7)
    scale = (NOPE + ROPE) ** -0.5
    indices = dsa_topk(queries["index_q"], queries["index_w"], key_cache, meta, 64, INDEX_DIM**-0.5)
    dense = _mla(meta, cache, queries, w_kv, scale)
    torch.testing.assert_close(_mla(meta, cache, queries, w_kv, scale, indices), dense)
