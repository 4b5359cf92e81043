"""Which part of each weight a tensor-parallel rank holds (Megatron's split): attention heads, the MLP's
intermediate channels and the vocabulary, each cut into contiguous shares as even as the counts allow.

Heads: the query heads are shared out evenly; a rank holds the KV heads its query heads read. The attention kernels
take `group` query heads per KV head, so each held KV head comes with its group's whole set of query heads. A KV head
whose group spans several ranks (its "sharers") is held by each of them, with all of its group's query heads, and
its attention work is split by rows instead: sharer i of n attends the step's query rows even_share(rows, n, i) of
that group and leaves the group's other rows zero, so that the row-parallel o_proj's all-reduce sums each row's
group output from exactly one rank, and each rank reads a shared KV head's cache for its share of the rows only.
A rank lists its own KV heads first and its shared ones last: the rows it attends for no shared group then need only
the first inputs of its o_proj (the one-call C forward skips the rest, kernels/cpu/step_forward.c).
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
    kv_heads: list[int]  # the global KV heads this rank holds: its own ascending, then the shared ones ascending
    q_slots: list[int]  # per local query head (kv_heads[i] owns slots [i * group, (i + 1) * group)): its global head
    row_shares: list[tuple[int, int]]  # per held KV head: (i, n): this rank is sharer i of n ((0, 1): its own)

    @property
    def splits_rows(self) -> bool:
        return any(n > 1 for _, n in self.row_shares)


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    if world_size > num_heads:
        raise ValueError(f"tensor_parallel_size={world_size} exceeds the model's {num_heads} attention heads")
    group = num_heads // num_kv_heads
    ranges = [even_share(num_heads, world_size, r) for r in range(world_size)]
    first, end = ranges[rank]
    shares: dict[int, tuple[int, int]] = {}
    for kv in range(first // group, (end - 1) // group + 1):
        sharers = [r for r, (a, b) in enumerate(ranges) if a < (kv + 1) * group and kv * group < b]
        shares[kv] = (sharers.index(rank), len(sharers))
    kv_heads = sorted(shares, key=lambda kv: (shares[kv][1] > 1, kv))  # own first, shared last
    slots = [h for kv in kv_heads for h in range(kv * group, (kv + 1) * group)]
    return HeadShard(kv_heads, slots, [shares[kv] for kv in kv_heads])
