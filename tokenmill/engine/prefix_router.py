"""PrefixRouter: which data-parallel replica a new request goes to — the one whose prefix cache most likely holds
the longest prefix of its prompt, unless that replica is already much busier than the least busy one; otherwise the
least busy (SGLang's cache-aware routing, on the engine's own block hashing).

The router cannot see the replicas' caches, so it keeps its own picture of them: for each replica, the chained
hashes of the full KV blocks of the prompts it was sent (the same chaining as the prefix cache: a block's hash
covers every token before it), least recently routed first out once a replica holds more of them than its KV cache
has blocks. A replica's cache may have evicted a block the router still lists; the cost of that is a routing that
finds less than expected, never a wrong output.

Invariants: route() returns an index in [0, num_replicas); a prompt shorter than one block never counts as a match;
among equally good choices the replica sent the fewest requests so far wins, so unrelated requests spread evenly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks: hashes[i] stands for tokens [0, (i + 1) * block_size)."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixRouter:
    def __init__(self, num_replicas: int, block_size: int, capacity_blocks: int, balance_limit: int,
                 by_prefix: bool = True) -> None:
        """capacity_blocks: the KV blocks one replica holds (its picture is bounded by it); balance_limit: how many
        more requests in flight the best-matching replica may have than the least busy one and still be chosen;
        by_prefix False: always the least busy (--data-parallel-routing load)."""
        if num_replicas < 1 or block_size < 1 or capacity_blocks < 1 or balance_limit < 0:
            raise ValueError("PrefixRouter needs num_replicas, block_size, capacity_blocks >= 1 and balance_limit >= 0")
        self.num_replicas = num_replicas
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.balance_limit = balance_limit
        self.by_prefix = by_prefix
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.routed = [0] * num_replicas  # requests sent to each replica so far
        self.routed_by_prefix = 0  # of them, those sent where a prefix matched

    def matched_blocks(self, hashes: list[int]) -> list[int]:
        """For each replica, how many leading blocks of the prompt it is believed to hold."""
        matches = []
        for blocks in self._blocks:
            n = 0
            while n < len(hashes) and hashes[n] in blocks:
                n += 1
            matches.append(n)
        return matches

    def route(self, token_ids: Sequence[int], loads: Sequence[int]) -> int:
        """The replica for a prompt, given each replica's requests in flight; records the prompt's blocks there."""
        if len(loads) != self.num_replicas:
            raise ValueError(f"expected {self.num_replicas} loads, got {len(loads)}")
        hashes = block_hashes(token_ids, self.block_size) if self.by_prefix else []
        matches = self.matched_blocks(hashes)
        least_load = min(loads)

        def spread_order(i: int) -> tuple[int, int, int]:
            return loads[i], self.routed[i], i

        candidates = [i for i in range(self.num_replicas)
                      if matches[i] > 0 and loads[i] - least_load <= self.balance_limit]
        if candidates:
            best = max(matches[i] for i in candidates)
            choice = min((i for i in candidates if matches[i] == best), key=spread_order)
            self.routed_by_prefix += 1
        else:
            choice = min(range(self.num_replicas), key=spread_order)
        self._remember(choice, hashes)
        self.routed[choice] += 1
        return choice

    def _remember(self, replica: int, hashes: list[int]) -> None:
        blocks = self._blocks[replica]
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
