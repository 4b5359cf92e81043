"""Which part of each weight a tensor-parallel rank holds (Megatron's split): attention heads, the MLP's
intermediate channels and the vocabulary, each cut into contiguous shares as even as the counts allow.

Heads: the query heads are shared out evenly; a rank holds the KV heads its query heads read (a KV head whose group
spans two ranks is held, and computed, by both). The attention kernels take `group` query heads per KV head, so each
held KV head gets its group's whole set of query slots, a slot whose head belongs to another rank being a pad: zero
query weights and zero output-projection columns, so it adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


def even_share(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of share `index` when n items are cut into `parts` contiguous shares differing by at most one."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class HeadShard:
    kv_heads: list[int]  # the global KV heads this rank holds, ascending
    q_slots: list[int | None]  # per local query head (kv_heads[i] owns slots [i * group, (i + 1) * group)): the
    # global query head it computes, or None for a pad


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    if world_size > num_heads:
        raise ValueError(f"tensor_parallel_size={world_size} exceeds the model's {num_heads} attention heads")
    group = num_heads // num_kv_heads
    first, end = even_share(num_heads, world_size, rank)
    kv_heads = list(range(first // group, (end - 1) // group + 1))
    slots = [h if first <= h < end else None for kv in kv_heads for h in range(kv * group, (kv + 1) * group)]
    return HeadShard(kv_heads, slots)
