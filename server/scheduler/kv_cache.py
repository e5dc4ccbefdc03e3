"""Paged KV block manager: block ids, reference counts and the prefix cache. Plain Python, no device.

A request's KV cache lives in fixed-size blocks; its block table lists them in token order. A block that
is full of computed tokens is registered under a hash of its whole prefix (hash chain: the hash of
(parent block hash, this block's token ids)), so a later request with the same prefix takes a reference
on the same block instead of computing it again. A block with no references is free; if it still carries
a hash it stays in the prefix cache until a new allocation evicts it (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from server.scheduler.request import Request


@dataclass(slots=True)
class _RequestBlocks:
    """What the manager keeps per request: its block table and the hash chain of its full blocks."""

    table: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hashes of blocks 0..len-1 of its token sequence
    num_registered: int = 0  # blocks of the table already offered to the prefix cache


class KVCacheManager:
    """Hands out KV blocks to requests; shares full prompt-prefix blocks between them.

    Block tables returned by allocate_slots() and block_table() are the manager's own lists: read them,
    never mutate them. A table only ever grows while its request holds it (existing entries never change),
    and free() detaches it, so a table handed to the model runner stays valid for the step it was made for.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks  # hash a block is registered under
        self._cached: dict[int, int] = {}  # prefix hash -> block id
        # Free blocks, least recently freed first (ref count 0; cached ones stay evictable here).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._requests: dict[str, _RequestBlocks] = {}

    # -- queries ---------------------------------------------------------------------------------

    def num_free_blocks(self) -> int:
        """Blocks with no reference, including cached blocks that an allocation may evict."""
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order ([] if it holds none). Do not mutate."""
        state = self._requests.get(request_id)
        return state.table if state is not None else []

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (held or evictable)."""
        return len(self._cached)

    # -- prefix cache ------------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Prefix-cache lookup for a request that holds no blocks yet.

        Returns the longest chain of cached full blocks that starts the request's token sequence, and the
        number of tokens they hold. At least one token is always left to compute, so at most
        (num_tokens - 1) // block_size blocks are returned. Takes no references.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        state = self._requests.setdefault(request.request_id, _RequestBlocks())
        assert not state.table, f"request {request.request_id} already holds blocks"
        hashes = self._hash_blocks(request, state.hashes, max_blocks)
        blocks: list[int] = []
        for i in range(max_blocks):
            block_id = self._cached.get(hashes[i])
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register every block of the request that is now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        state = self._requests.get(request.request_id)
        if state is None:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(state.table))
        if num_full <= state.num_registered:
            return
        hashes = self._hash_blocks(request, state.hashes, num_full)
        for i in range(state.num_registered, num_full):
            block_hash = hashes[i]
            block_id = state.table[i]
            if block_hash not in self._cached:
                assert self._block_hashes[block_id] is None, f"block {block_id} is registered twice"
                self._cached[block_hash] = block_id
                self._block_hashes[block_id] = block_hash
            # else: another request computed the same prefix first; this copy stays unregistered.
        state.num_registered = num_full

    def _hash_blocks(self, request: Request, hashes: list[int], num_blocks: int) -> list[int]:
        """Extend the request's hash chain to cover its first num_blocks blocks; returns the chain."""
        size = self.block_size
        prompt = request.prompt_token_ids
        output = request.output_token_ids
        num_prompt = len(prompt)
        for i in range(len(hashes), num_blocks):
            start, end = i * size, (i + 1) * size
            if end <= num_prompt:
                tokens = tuple(prompt[start:end])
            elif start >= num_prompt:
                tokens = tuple(output[start - num_prompt : end - num_prompt])
            else:
                tokens = tuple(prompt[start:]) + tuple(output[: end - num_prompt])
            parent = hashes[i - 1] if i else None
            hashes.append(hash((parent, tokens)))
        return hashes

    # -- allocation --------------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Make the request hold blocks for num_computed_tokens + num_new_tokens tokens.

        With computed_blocks (from get_computed_blocks), the request holds no blocks yet: references are
        taken on those first, and request.num_computed_tokens already counts their tokens. All or nothing:
        returns None and changes nothing when the free blocks do not suffice; otherwise returns the
        request's whole block table.
        """
        state = self._requests.get(request.request_id)
        if state is None:
            state = self._requests[request.request_id] = _RequestBlocks()
        table = state.table
        num_needed = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        if not computed_blocks:
            if num_needed <= len(table):
                return table
            num_reused_free = 0
        else:
            assert not table, f"request {request.request_id} already holds blocks"
            num_reused_free = sum(1 for b in computed_blocks if self._ref_counts[b] == 0)
        num_new_blocks = num_needed - len(table) - len(computed_blocks or ())
        if num_new_blocks > len(self._free) - num_reused_free:
            return None
        if computed_blocks:
            for block_id in computed_blocks:
                if self._ref_counts[block_id] == 0:
                    del self._free[block_id]
                self._ref_counts[block_id] += 1
            table.extend(computed_blocks)
            state.num_registered = len(computed_blocks)
        for _ in range(num_new_blocks):
            table.append(self._take_free_block())
        return table

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block_hash = self._block_hashes[block_id]
        if block_hash is not None:  # evict it from the prefix cache
            assert self._cached.get(block_hash) == block_id
            del self._cached[block_hash]
            self._block_hashes[block_id] = None
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id

    def free(self, request: Request) -> None:
        """Drop all of the request's references (a no-op if it holds none). Registered blocks stay cached
        and evictable; the tail of the table is freed first, so it is evicted before the shared head."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return
        ref_counts = self._ref_counts
        for block_id in reversed(state.table):
            ref_counts[block_id] -= 1
            assert ref_counts[block_id] >= 0, f"block {block_id} freed more often than allocated"
            if ref_counts[block_id] == 0:
                self._free[block_id] = None

    # -- checks ------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the manager's internal consistency (for tests and debugging; O(num_blocks))."""
        held = [0] * self.num_blocks
        for state in self._requests.values():
            assert len(set(state.table)) == len(state.table), "a block appears twice in one table"
            for block_id in state.table:
                held[block_id] += 1
        assert held == self._ref_counts, "ref counts disagree with the block tables"
        assert set(self._free) == {b for b, n in enumerate(self._ref_counts) if n == 0}
        for block_hash, block_id in self._cached.items():
            assert self._block_hashes[block_id] == block_hash
        assert sum(h is not None for h in self._block_hashes) == len(self._cached)
