"""glm_kernels/reference.py: paged attention over a mixed batch equals dense causal attention per request."""

import random

import pytest
import torch

from glm_kernels.metadata import build_metadata, write_rows
from glm_kernels.reference import naive_attention, paged_attention


def _random_case(seed: int, block_size: int, heads: int, kv_heads: int, dim: int, n_req: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    starts, q_lens, tables = [], [], []
    num_blocks = 256
    free = list(range(num_blocks))
    rng.shuffle(free)
    for _ in range(n_req):
        start = rng.choice([0, rng.randint(1, 70)])
        q_len = rng.choice([1, 1, rng.randint(1, 40)])
        n_blocks = (start + q_len + block_size - 1) // block_size
        tables.append([free.pop() for _ in range(n_blocks)])
        starts.append(start)
        q_lens.append(q_len)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    return starts, q_lens, tables, k_cache, v_cache


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size,heads,kv_heads,dim", [(16, 4, 2, 32), (8, 6, 6, 16), (32, 8, 1, 64)])
def test_paged_attention_matches_dense(seed, block_size, heads, kv_heads, dim):
    starts, q_lens, tables, k_cache, v_cache = _random_case(seed, block_size, heads, kv_heads, dim, n_req=5)
    total = sum(q_lens)
    q = torch.randn(total, heads, dim)
    k_new = torch.randn(total, kv_heads, dim)
    v_new = torch.randn(total, kv_heads, dim)
    meta = build_metadata(starts, q_lens, tables, block_size)
    write_rows(k_cache, k_new, meta.step.slot_mapping)
    write_rows(v_cache, v_new, meta.step.slot_mapping)
    out = paged_attention(q, k_cache, v_cache, meta, scale=dim**-0.5)

    offset = 0
    for start, q_len, table in zip(starts, q_lens, tables, strict=True):
        length = start + q_len
        keys = k_cache[table].reshape(-1, kv_heads, dim)[:length]
        values = v_cache[table].reshape(-1, kv_heads, dim)[:length]
        # the new tokens really landed in their slots
        torch.testing.assert_close(keys[start:], k_new[offset : offset + q_len])
        expected = naive_attention(q[offset : offset + q_len], keys, values, start, dim**-0.5)
        torch.testing.assert_close(out[offset : offset + q_len], expected, rtol=1e-5, atol=1e-5)
        offset += q_len


def test_prefix_ending_mid_block_and_decode_only():
    block_size, heads, dim = 16, 2, 8
    starts, q_lens, tables = [21, 5, 0], [1, 1, 1], [[3, 7], [1], [9]]
    k_cache = torch.randn(10, block_size, heads, dim)
    v_cache = torch.randn(10, block_size, heads, dim)
    q = torch.randn(3, heads, dim)
    meta = build_metadata(starts, q_lens, tables, block_size)
    assert len(meta.groups) == 1 and meta.groups[0].mask is None  # decode-only: no query padding
    write_rows(k_cache, torch.randn(3, heads, dim), meta.step.slot_mapping)
    write_rows(v_cache, torch.randn(3, heads, dim), meta.step.slot_mapping)
    out = paged_attention(q, k_cache, v_cache, meta, scale=0.3)
    for i, (start, table) in enumerate(zip(starts, tables, strict=True)):
        keys = k_cache[table].reshape(-1, heads, dim)[: start + 1]
        values = v_cache[table].reshape(-1, heads, dim)[: start + 1]
        torch.testing.assert_close(out[i : i + 1], naive_attention(q[i : i + 1], keys, values, start, 0.3))
