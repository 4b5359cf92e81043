"""PrefixRouter (engine/prefix_router.py): prompts sharing a cached prefix go to the replica that holds it, unless it
is too busy; unrelated prompts spread; a replica's picture of its cache is bounded by its KV blocks."""

from __future__ import annotations

import random

import pytest

from tokenmill.engine.prefix_router import PrefixRouter, block_hashes


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(50_000) for _ in range(n)]


def test_block_hashes_are_chained_over_full_blocks() -> None:
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the last 8 tokens do not fill a block
    assert block_hashes(list(range(32)) + [7] * 8, 16) == a
    assert block_hashes([99] + list(range(1, 40)), 16)[1] != a[1]  # a block's hash covers every token before it
    assert block_hashes(list(range(15)), 16) == []


def test_shared_prefixes_stick_and_unrelated_prompts_spread() -> None:
    rng = random.Random(0)
    router = PrefixRouter(2, block_size=16, capacity_blocks=1000, balance_limit=32)
    system = _prompt(rng, 64)
    first = router.route(system + _prompt(rng, 5), [0, 0])
    assert [router.route(system + _prompt(rng, 5), [0, 0]) for _ in range(5)] == [first] * 5
    assert router.routed_by_prefix == 5
    unrelated = [router.route(_prompt(rng, 40), [0, 0]) for _ in range(10)]
    assert router.routed == [8, 8]  # the other replica first caught up, then they alternate
    assert unrelated.count(1 - first) == 8


def test_the_longest_cached_prefix_wins() -> None:
    rng = random.Random(1)
    router = PrefixRouter(3, block_size=16, capacity_blocks=1000, balance_limit=32)
    base = _prompt(rng, 32)
    longer = base + _prompt(rng, 32)
    assert router.route(base + _prompt(rng, 3), [0, 0, 0]) == 0
    assert router.route(_prompt(rng, 20), [0, 0, 0]) == 1
    router._remember(2, block_hashes(longer, 16))
    assert router.matched_blocks(block_hashes(longer + [1, 2], 16)) == [2, 0, 4]
    assert router.route(longer + [1, 2], [0, 0, 0]) == 2


def test_a_busy_replica_loses_its_prefix_advantage() -> None:
    rng = random.Random(2)
    router = PrefixRouter(2, block_size=16, capacity_blocks=1000, balance_limit=4)
    system = _prompt(rng, 48)
    assert router.route(system + [1], [0, 0]) == 0
    assert router.route(system + [2], [4, 0]) == 0  # 4 more in flight: still within the limit
    assert router.route(system + [3], [5, 0]) == 1  # 5 more: the least busy replica gets it


def test_the_picture_of_a_cache_is_bounded_by_its_blocks() -> None:
    rng = random.Random(3)
    router = PrefixRouter(2, block_size=16, capacity_blocks=4, balance_limit=32)
    old = _prompt(rng, 64)  # 4 blocks: fills replica 0's picture
    assert router.route(old, [0, 0]) == 0
    assert router.route(_prompt(rng, 64), [1, 0]) == 1
    assert router.route(_prompt(rng, 64), [0, 0]) == 0  # evicts `old`'s blocks from replica 0's picture
    assert router.matched_blocks(block_hashes(old, 16)) == [0, 0]


def test_load_routing_ignores_prefixes() -> None:
    rng = random.Random(4)
    router = PrefixRouter(2, block_size=16, capacity_blocks=1000, balance_limit=32, by_prefix=False)
    system = _prompt(rng, 64)
    assert [router.route(system + [i], [0, 0]) for i in range(4)] == [0, 1, 0, 1]
    assert router.routed_by_prefix == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PrefixRouter(0, 16, 10, 1)
    with pytest.raises(ValueError):
        PrefixRouter(2, 16, 10, 1).route([1, 2, 3], [0])
