"""Unit and property tests of the paged KV block manager (server/scheduler/kv_cache.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.scheduler.kv_cache import KVCacheManager
from server.scheduler.request import Request, SamplingParams

BLOCK = 4


def make_request(request_id: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id, list(tokens), SamplingParams(max_tokens=max_tokens))


def compute(kv: KVCacheManager, request: Request, num_tokens: int) -> list[int]:
    """Allocate for num_tokens more tokens, mark them computed and cache full blocks (one runner step)."""
    table = kv.allocate_slots(request, num_tokens)
    assert table is not None
    request.num_computed_tokens += num_tokens
    kv.cache_full_blocks(request)
    return list(table)


def admit(kv: KVCacheManager, request: Request) -> tuple[list[int], int]:
    """First schedule of a request: prefix-cache lookup, then allocate the rest of its tokens."""
    blocks, num_cached = kv.get_computed_blocks(request)
    request.num_computed_tokens = num_cached
    table = kv.allocate_slots(request, request.num_tokens - num_cached, blocks)
    assert table is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return list(table), num_cached


def test_allocate_and_free_restores_everything() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    request = make_request("a", list(range(10)))
    table = kv.allocate_slots(request, 10)
    assert table is not None and len(table) == 3 and len(set(table)) == 3
    assert all(0 <= b < 10 for b in table)
    assert kv.num_free_blocks() == 7
    assert kv.usage() == pytest.approx(0.3)
    assert kv.block_table("a") == table
    kv.free(request)
    assert kv.num_free_blocks() == 10
    assert kv.usage() == 0.0
    assert kv.block_table("a") == []
    kv.check_invariants()


def test_table_grows_only_at_block_boundaries() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    request = make_request("a", [1, 2, 3])
    first = compute(kv, request, 3)
    assert len(first) == 1
    assert compute(kv, request, 1) == first  # position 3 still fits block 0
    grown = compute(kv, request, 1)  # position 4 opens block 1
    assert grown[:1] == first and len(grown) == 2
    kv.check_invariants()


def test_allocation_failure_is_atomic() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)
    holder = make_request("holder", list(range(8)))
    assert kv.allocate_slots(holder, 8) is not None
    request = make_request("big", list(range(100, 112)))
    assert kv.allocate_slots(request, 12) is None  # needs 3, 2 free
    assert kv.num_free_blocks() == 2
    assert kv.block_table("big") == []
    assert kv.allocate_slots(request, 8) is not None
    assert kv.num_free_blocks() == 0
    kv.check_invariants()


def test_failed_allocation_with_computed_blocks_takes_no_refs() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)
    first = make_request("first", list(range(9)))
    first_table, _ = admit(kv, first)
    kv.free(first)  # its two full blocks stay cached and evictable
    second = make_request("second", list(range(8)) + list(range(50, 62)))  # 20 tokens: 5 blocks
    blocks, num_cached = kv.get_computed_blocks(second)
    assert blocks == first_table[:2] and num_cached == 8
    second.num_computed_tokens = num_cached
    assert kv.allocate_slots(second, second.num_tokens - num_cached, blocks) is None
    assert all(kv.ref_count(b) == 0 for b in blocks)
    assert kv.num_free_blocks() == 4 and kv.num_cached_blocks() == 2
    kv.check_invariants()


def test_shared_prefix_reuses_the_same_blocks_with_ref_counts() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    prompt = list(range(12))
    first = make_request("first", prompt)
    first_table, _ = admit(kv, first)
    second = make_request("second", prompt[:8] + [99, 98, 97])
    second_table, num_cached = admit(kv, second)
    assert num_cached == 8
    assert second_table[:2] == first_table[:2]
    assert second_table[2] not in first_table
    assert [kv.ref_count(b) for b in first_table] == [2, 2, 1]
    assert kv.num_free_blocks() == 16 - 4
    kv.free(first)
    assert [kv.ref_count(b) for b in second_table] == [1, 1, 1]
    kv.free(second)
    assert kv.num_free_blocks() == 16 and kv.usage() == 0.0
    kv.check_invariants()


def test_lookup_never_returns_all_tokens() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    prompt = list(range(8))  # exactly two full blocks
    first = make_request("first", prompt + [42])
    admit(kv, first)
    same = make_request("same", prompt)
    blocks, num_cached = kv.get_computed_blocks(same)
    assert len(blocks) == 1 and num_cached == 4  # the last block must be computed to sample
    longer = make_request("longer", prompt + [7])
    assert kv.get_computed_blocks(longer)[1] == 8


def test_only_full_computed_blocks_are_cached() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    request = make_request("a", list(range(10)))
    kv.allocate_slots(request, 10)
    request.num_computed_tokens = 6  # one full block computed, the second half done
    kv.cache_full_blocks(request)
    assert kv.num_cached_blocks() == 1
    request.num_computed_tokens = 10
    kv.cache_full_blocks(request)
    assert kv.num_cached_blocks() == 2


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: no hit at all.
    assert kv.get_computed_blocks(make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == ([], 0)


def test_cached_blocks_survive_free_and_count_as_free() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    first = make_request("first", list(range(9)))
    first_table, _ = admit(kv, first)
    kv.free(first)
    assert kv.num_free_blocks() == 8 and kv.usage() == 0.0
    second = make_request("second", list(range(9)))
    second_table, num_cached = admit(kv, second)
    assert num_cached == 8 and second_table[:2] == first_table[:2]
    assert kv.num_free_blocks() == 5
    kv.check_invariants()


def test_eviction_takes_least_recently_freed_and_drops_its_hash() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)
    old = make_request("old", list(range(5)))  # 1 full block + 1 partial
    old_table, _ = admit(kv, old)
    new = make_request("new", list(range(100, 105)))
    new_table, _ = admit(kv, new)
    kv.free(old)
    kv.free(new)
    assert kv.num_cached_blocks() == 2
    # Free order is old's tail, old's head, new's tail, new's head: three fresh blocks take the first
    # three, evicting old's cached head but not new's.
    filler = make_request("filler", [7] * 12)
    table = kv.allocate_slots(filler, 12)
    assert table is not None and old_table[0] in table and new_table[0] not in table
    assert kv.num_cached_blocks() == 1
    assert kv.get_computed_blocks(make_request("old2", list(range(5)))) == ([], 0)
    assert kv.get_computed_blocks(make_request("new2", list(range(100, 105))))[1] == 4
    kv.check_invariants()


def test_tail_blocks_are_evicted_before_the_prefix() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BLOCK)
    request = make_request("a", list(range(13)))
    table = compute(kv, request, 12)
    kv.free(request)
    filler = make_request("filler", [5])
    assert kv.allocate_slots(filler, 1) == [table[2]]  # the tail block goes first
    assert kv.get_computed_blocks(make_request("b", list(range(13))))[1] == 8
    kv.check_invariants()


def test_free_twice_is_a_no_op() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BLOCK)
    request = make_request("a", list(range(6)))
    kv.allocate_slots(request, 6)
    kv.free(request)
    kv.free(request)
    assert kv.num_free_blocks() == 4
    kv.check_invariants()


def test_concurrent_duplicates_are_registered_once() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(8)))
    table_a, table_b = compute(kv, a, 8), compute(kv, b, 8)  # neither saw the other in the cache
    assert set(table_a).isdisjoint(table_b)
    assert kv.num_cached_blocks() == 2
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks() == 8
    assert kv.get_computed_blocks(make_request("c", list(range(9))))[0] == table_a
    kv.check_invariants()


def test_prefix_caching_disabled_never_hashes() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    first = make_request("first", list(range(9)))
    admit(kv, first)
    assert kv.num_cached_blocks() == 0
    assert kv.get_computed_blocks(make_request("second", list(range(9)))) == ([], 0)
    kv.free(first)
    assert kv.num_free_blocks() == 8


def test_output_tokens_are_part_of_the_prefix() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BLOCK)
    request = make_request("a", [1, 2, 3])
    compute(kv, request, 3)
    request.output_token_ids += [4, 5, 6]
    compute(kv, request, 3)  # positions 3..5: block 0 is now full of prompt + output
    assert kv.num_cached_blocks() == 1
    assert kv.get_computed_blocks(make_request("b", [1, 2, 3, 4, 5]))[1] == 4


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 4),
    caching=st.booleans(),
    ops=st.lists(
        st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 4), st.integers(1, 9)),
        max_size=40,
    ),
)
def test_random_operations_keep_invariants(
    num_blocks: int, block_size: int, caching: bool, ops: list[tuple[str, int, int]]
) -> None:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    live: dict[int, Request] = {}
    for op, slot, size in ops:
        request = live.get(slot)
        if op == "admit" and request is None:
            request = make_request(f"r{slot}-{len(ops)}", [t % 3 for t in range(slot, slot + size)])
            blocks, num_cached = kv.get_computed_blocks(request)
            assert num_cached < request.num_tokens and num_cached == len(blocks) * block_size
            request.num_computed_tokens = num_cached
            free_before = kv.num_free_blocks()
            if kv.allocate_slots(request, request.num_tokens - num_cached, blocks) is None:
                assert kv.num_free_blocks() == free_before
                kv.free(request)  # drops the looked-up hashes of a request that never ran
            else:
                request.num_computed_tokens = request.num_tokens
                kv.cache_full_blocks(request)
                live[slot] = request
        elif op == "grow" and request is not None:
            request.output_token_ids.append(size % 3)
            if kv.allocate_slots(request, 1) is not None:
                request.num_computed_tokens += 1
                kv.cache_full_blocks(request)
                assert len(kv.block_table(request.request_id)) * block_size >= request.num_computed_tokens
            else:
                request.output_token_ids.pop()
        elif op == "free" and request is not None:
            kv.free(live.pop(slot))
        kv.check_invariants()
        assert 0 <= kv.num_free_blocks() <= num_blocks
    for request in live.values():
        kv.free(request)
    kv.check_invariants()
    assert kv.num_free_blocks() == num_blocks and kv.usage() == 0.0
