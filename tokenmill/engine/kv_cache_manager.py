"""KV-cache block pool with prefix caching. Plain Python, no torch.

Blocks are ids 0..num_blocks-1. Each block has a reference count (the number of requests whose block
table holds it) and, once its whole content is known *and computed*, a hash that chains its parent
block's hash with its token ids. Hashed blocks are registered in a hash -> block map, so a later
request with the same prefix can reuse them instead of recomputing them.

Free blocks (ref count 0) sit in one of two sets, and a new block comes from the first that has one:
- blocks without a hash (never filled, or holding nothing reusable), lowest id first. So requests get
  runs of neighbouring blocks however often the pool has turned over: the decode attention kernels read a
  request's blocks one after another, and scattered blocks read slower (a bf16 layer of 64 requests x 320
  positions on the AMX Xeon: 0.97 ms with the blocks at random places against 0.74 in order;
  benchmarks/decode_attention.py --block-order sequential,shuffled). Reused last-freed-first instead, as
  before, W1 run five times over in one engine without prefix caching (benchmarks/kv_fragmentation.py) took
  8.1, 8.8, 8.9, 9.4, 9.7 s as the share of blocks next to the one before fell 65, 40, 25, 14, 7%; lowest
  first: 8.0-8.5 s, 65% each time.
- hashed blocks, in LRU order: a hashed free block still holds valid KV and can be hit (which takes it off
  the list again); taking one for new tokens evicts the list's head and drops the block's old hash. When a
  request is freed, its hashed blocks are appended at the tail in reverse order, so the tail blocks of a
  sequence are evicted before its head blocks (which more requests share).

A block is registered only once its tokens' KV has been computed, i.e. for the full blocks within
request.num_computed_tokens (checked in allocate_slots and free). So a hit never points at KV that a
step has not written yet, even if that step's request is preempted or aborted before it runs.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from tokenmill.engine.request import Request


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block: sha256 over the parent's hash and the block's token ids
    (a cryptographic hash, so crafted prompts cannot collide with another user's prefix)."""
    h = hashlib.sha256()
    if parent_hash is not None:
        h.update(parent_hash.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest()[:16], "little")


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        self._cached_blocks: dict[int, int] = {}  # block hash -> block id
        # Free blocks (module docstring): without a hash, a heap of ids; with one, LRU order (head evicted first).
        self._free_unhashed: list[int] = list(range(num_blocks))  # sorted, so a valid heap
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._req_block_ids: dict[str, list[int]] = {}
        self._req_num_hashed: dict[str, int] = {}  # leading blocks of a request already registered
        # Prefix-cache counters, in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (including cached ones that can still be hit or evicted)."""
        return len(self._free_unhashed) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_block_ids(self, req_id: str) -> list[int]:
        return list(self._req_block_ids.get(req_id, ()))

    # -- prefix cache ------------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of the request's leading full blocks that are cached, and its length in
        tokens. At least one token is always left to compute (its logits give the next token)."""
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_hashes(request, max_blocks)
        block_ids = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self._cached_blocks.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        num_hit_tokens = len(block_ids) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return block_ids, num_hit_tokens

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block; only possible (returns True) when no request holds blocks."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self._cached_blocks.clear()
        self._block_hashes = [None] * self.num_blocks
        self._free_unhashed = list(range(self.num_blocks))
        self._free_cached.clear()
        return True

    # -- allocation ----------------------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Makes the request own blocks for num_computed_tokens (+ the prefix hit new_computed_blocks,
        passed only at first admission) + num_new_tokens tokens. Returns its whole block table, or
        None, without any change, when there are not enough free blocks."""
        block_ids = self._req_block_ids.get(request.req_id, [])
        if new_computed_blocks and block_ids:
            raise ValueError(f"request {request.req_id!r} already holds blocks; prefix hits apply at admission only")
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size)
        num_alloc = max(0, num_needed - len(block_ids) - len(new_computed_blocks))
        num_hit_free = sum(1 for b in new_computed_blocks if self._ref_counts[b] == 0)
        if num_alloc > self.num_free_blocks - num_hit_free:
            return None

        for block_id in new_computed_blocks:
            if self._ref_counts[block_id] == 0:
                del self._free_cached[block_id]  # a hit is hashed
            self._ref_counts[block_id] += 1
        block_ids.extend(new_computed_blocks)
        for _ in range(num_alloc):
            block_ids.append(self._take_free_block())
        self._req_block_ids[request.req_id] = block_ids
        if self.enable_prefix_caching:
            self._register_full_blocks(request, num_computed)
        return list(block_ids)

    def free(self, request: Request) -> None:
        """Releases the request's blocks. Its computed full blocks stay cached until evicted."""
        block_ids = self._req_block_ids.get(request.req_id)
        if block_ids is None:
            return
        if self.enable_prefix_caching:
            self._register_full_blocks(request, request.num_computed_tokens)
        del self._req_block_ids[request.req_id]
        self._req_num_hashed.pop(request.req_id, None)
        for block_id in reversed(block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._block_hashes[block_id] is None:
                    heapq.heappush(self._free_unhashed, block_id)
                else:
                    self._free_cached[block_id] = None

    # -- internals -----------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        """The lowest free block without a hash, else the least recently used hashed one (its hash dropped)."""
        if self._free_unhashed:
            block_id = heapq.heappop(self._free_unhashed)
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            del self._cached_blocks[self._block_hashes[block_id]]
            self._block_hashes[block_id] = None
        self._ref_counts[block_id] = 1
        return block_id

    def _update_hashes(self, request: Request, num_blocks: int) -> None:
        """Extends request.block_hashes to cover its first num_blocks (full) blocks."""
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))

    def _register_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Registers the request's blocks that are full of computed tokens in the prefix cache."""
        block_ids = self._req_block_ids[request.req_id]
        num_full = min(num_computed_tokens, request.num_tokens, len(block_ids) * self.block_size) // self.block_size
        start = self._req_num_hashed.get(request.req_id, 0)
        if num_full <= start:
            return
        self._update_hashes(request, num_full)
        for i in range(start, num_full):
            block_id, block_hash = block_ids[i], request.block_hashes[i]
            # Skip blocks already hashed (prefix hits) and duplicates of content cached elsewhere.
            if self._block_hashes[block_id] is None and block_hash not in self._cached_blocks:
                self._block_hashes[block_id] = block_hash
                self._cached_blocks[block_hash] = block_id
        self._req_num_hashed[request.req_id] = num_full
