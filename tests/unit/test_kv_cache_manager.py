"""KVCacheManager: allocation, prefix-cache hits, ref counts, LRU eviction. No model."""

from __future__ import annotations

import pytest

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

BS = 4


@pytest.fixture
def make_kv():
    """Factory for managers; after the test every block must be free again."""
    managers: list[KVCacheManager] = []

    def make(num_blocks: int = 8, enable_prefix_caching: bool = True) -> KVCacheManager:
        kv = KVCacheManager(num_blocks, BS, enable_prefix_caching)
        managers.append(kv)
        return kv

    yield make
    for kv in managers:
        assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
        assert kv.usage == 0.0


def req(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8))


def compute(kv: KVCacheManager, request: Request, num_new: int | None = None, hit=()) -> list[int]:
    """Allocates like the scheduler would and marks the tokens computed (as update_from_output does)."""
    hit_tokens = len(hit) * BS
    num_new = request.num_tokens - request.num_computed_tokens - hit_tokens if num_new is None else num_new
    block_ids = kv.allocate_slots(request, num_new, list(hit))
    assert block_ids is not None
    request.num_computed_tokens += hit_tokens + num_new
    return block_ids


def decode(kv: KVCacheManager, request: Request, token: int = 7) -> list[int]:
    request.append_output_token_ids([token])
    return compute(kv, request, 1)


def test_allocation_and_block_counts(make_kv):
    kv = make_kv(8)
    a = req("a", list(range(10)))  # 10 tokens -> 3 blocks
    blocks = compute(kv, a)
    assert len(blocks) == 3 and len(set(blocks)) == 3
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(3 / 8)
    assert kv.get_block_ids("a") == blocks
    # Decoding: tokens 11 and 12 fit in block 3; token 13 needs a 4th block.
    for token, expected in ((100, 3), (101, 3), (102, 4)):
        a.append_output_token_ids([token])
        assert len(compute(kv, a, 1)) == expected
    kv.free(a)
    assert kv.get_block_ids("a") == []
    kv.free(a)  # freeing twice is harmless


def test_prefix_hit_accounting_in_tokens_never_whole_prompt(make_kv):
    kv = make_kv(8)
    prompt = list(range(12))  # exactly 3 full blocks
    a = req("a", prompt)
    assert kv.get_computed_blocks(a) == ([], 0)
    a_blocks = compute(kv, a)
    kv.free(a)
    b = req("b", prompt)
    hit, num_hit = kv.get_computed_blocks(b)
    # The whole prompt is cached, but the last token must still be computed: 2 blocks, not 3.
    assert hit == a_blocks[:2] and num_hit == 8
    assert kv.prefix_cache_queries == 24 and kv.prefix_cache_hits == 8
    compute(kv, b, hit=hit)
    assert kv.get_block_ids("b")[:2] == a_blocks[:2]
    kv.free(b)


def test_longer_prompt_hits_shared_prefix(make_kv):
    kv = make_kv(8)
    a = req("a", list(range(9)))  # 2 full blocks + 1 token
    compute(kv, a)
    decode(kv, a)  # the next step's allocation registers a's computed full blocks
    b = req("b", list(range(8)) + [50, 51, 52, 53, 54])
    hit, num_hit = kv.get_computed_blocks(b)  # a is still running: its computed blocks are shared
    assert num_hit == 8 and hit == kv.get_block_ids("a")[:2]
    compute(kv, b, hit=hit)
    kv.free(a)
    kv.free(b)


def test_uncomputed_blocks_are_not_hit(make_kv):
    kv = make_kv(8)
    a = req("a", list(range(12)))
    assert kv.allocate_slots(a, 12) is not None  # scheduled, but not computed yet
    assert kv.get_computed_blocks(req("b", list(range(12)))) == ([], 0)
    kv.free(a)  # e.g. preempted before the step ran: nothing was computed, nothing is cached
    assert kv.get_computed_blocks(req("c", list(range(12)))) == ([], 0)


def test_chained_hashes_same_block_under_other_parent_misses(make_kv):
    kv = make_kv(8)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, a)
    kv.free(a)
    # Second block [5..8] is identical, but its parent block differs: no hit at all.
    b = req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(b) == ([], 0)
    # Same first block, different second block: only the first hits.
    c = req("c", [1, 2, 3, 4, 5, 6, 7, 0, 9])
    hit, num_hit = kv.get_computed_blocks(c)
    assert num_hit == 4 and len(hit) == 1
    assert b.block_hashes[1] != a.block_hashes[1]


def test_ref_counts_shared_blocks(make_kv):
    kv = make_kv(6)
    prompt = list(range(9))
    a = req("a", prompt)
    compute(kv, a)  # 3 blocks
    decode(kv, a)
    b, c = req("b", prompt), req("c", prompt)
    for r in (b, c):
        hit, _ = kv.get_computed_blocks(r)
        assert len(hit) == 2
        compute(kv, r, hit=hit)  # shares 2 blocks, owns 1 new one
    assert kv.num_free_blocks == 6 - 3 - 1 - 1
    shared = kv.get_block_ids("a")[:2]
    assert kv.get_block_ids("b")[:2] == shared == kv.get_block_ids("c")[:2]
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 6 - 3  # c still holds the shared blocks and its own
    assert not set(shared) & (set(kv._free_unhashed) | set(kv._free_cached))
    kv.free(c)


def test_lru_eviction_order_and_evicted_block_loses_hash(make_kv):
    kv = make_kv(4)
    a = req("a", [1, 1, 1, 1, 2, 2, 2, 2])
    b = req("b", [3, 3, 3, 3, 4, 4, 4, 4])
    a_blocks, b_blocks = compute(kv, a), compute(kv, b)
    kv.free(a)  # freed first: evicted first; its tail block before its head block
    kv.free(b)
    c = req("c", [9] * 4)
    assert compute(kv, c, 4) == [a_blocks[1]]
    d = req("d", [8] * 4)
    assert compute(kv, d, 4) == [a_blocks[0]]
    # a's blocks were reused: a no longer hits; b still does (block 0 of it).
    assert kv.get_computed_blocks(req("a2", a.prompt_token_ids)) == ([], 0)
    hit, _ = kv.get_computed_blocks(req("b2", b.prompt_token_ids))
    assert hit == [b_blocks[0]]
    kv.free(c)
    kv.free(d)


def test_hit_takes_block_off_free_list(make_kv):
    kv = make_kv(3)
    a = req("a", list(range(8)))
    compute(kv, a)
    kv.free(a)
    b = req("b", list(range(8)) + [99])
    hit, _ = kv.get_computed_blocks(b)
    assert len(hit) == 2
    compute(kv, b, hit=hit)  # 2 hit blocks + 1 new = all 3 blocks
    assert kv.num_free_blocks == 0
    assert kv.get_block_ids("b")[:2] == hit
    kv.free(b)


def test_allocate_failure_changes_nothing(make_kv):
    kv = make_kv(3)
    a = req("a", list(range(8)))
    compute(kv, a)
    kv.free(a)
    b = req("b", list(range(8)) + list(range(100, 105)))  # needs 4 blocks, 2 of them cached
    hit, _ = kv.get_computed_blocks(b)
    free_before = (list(kv._free_unhashed), list(kv._free_cached))
    cached_before = dict(kv._cached_blocks)
    assert kv.allocate_slots(b, b.num_tokens - 8, hit) is None
    assert (list(kv._free_unhashed), list(kv._free_cached)) == free_before and kv._cached_blocks == cached_before
    assert kv.get_block_ids("b") == [] and kv._ref_counts == [0, 0, 0]
    c = req("c", list(range(20)))
    assert kv.allocate_slots(c, 20) is None
    assert kv.num_free_blocks == 3


def test_prefix_caching_disabled(make_kv):
    kv = make_kv(4, enable_prefix_caching=False)
    a = req("a", list(range(8)))
    compute(kv, a)
    kv.free(a)
    assert kv.get_computed_blocks(req("b", list(range(8)))) == ([], 0)
    assert kv.prefix_cache_queries == 0 and a.block_hashes == []


def test_reset_prefix_cache(make_kv):
    kv = make_kv(4)
    a = req("a", list(range(8)))
    compute(kv, a)
    assert not kv.reset_prefix_cache()  # blocks in use
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([], 0)


def test_duplicate_content_cached_once(make_kv):
    kv = make_kv(6)
    a, b = req("a", list(range(5))), req("b", list(range(5)))
    compute(kv, a)
    compute(kv, b)  # computed concurrently: same content in two blocks
    kv.free(a)
    kv.free(b)
    hit, _ = kv.get_computed_blocks(req("c", list(range(5))))
    assert len(hit) == 1
    assert len(kv._cached_blocks) == 1


def test_blocks_without_hash_are_reused_lowest_first(make_kv):
    """However the pool turned over, a new request gets the lowest free blocks without a hash, so its blocks are
    neighbours (the decode kernels stream them); hashed blocks only when none is left, least recently used first."""
    kv = make_kv(12, enable_prefix_caching=False)
    requests = [req(str(i), [i] * (2 * BS)) for i in range(4)]  # 2 blocks each: 0-1, 2-3, 4-5, 6-7
    for r in requests:
        compute(kv, r)
    for r in (requests[1], requests[3], requests[0]):  # freed out of order: 2-3, 6-7, 0-1 are free again
        kv.free(r)
    grown = req("g", [9] * (5 * BS))
    assert compute(kv, grown) == [0, 1, 2, 3, 6]  # not the last freed first (0, 1, 6, 7, 2)
    kv.free(requests[2])
    kv.free(grown)
    kv_cached = make_kv(4)
    a, b = req("a", [1] * BS + [5]), req("b", [2] * BS + [5])  # a full (hashed) block and a partial one each
    compute(kv_cached, a), compute(kv_cached, b)
    kv_cached.free(b)
    kv_cached.free(a)
    # The partial blocks (1, 3: no hash) first, lowest first; then the hashed ones in LRU order (b's 2, then a's 0).
    c = req("c", list(range(4 * BS)))
    assert compute(kv_cached, c) == [1, 3, 2, 0]
    kv_cached.free(c)
