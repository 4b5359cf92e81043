"""Collectives between the tensor-parallel ranks, over torch.distributed: gloo on the CPU, NCCL on CUDA.

One Communicator per process (torch.distributed's default group); SINGLE stands for a world of one, where every
collective is the identity. Reductions of a 16-bit tensor run in float32 (gloo sums what it is given, and a bf16 sum
of partial products would round at every rank). Ranks on one machine sum through shared memory where the tensor fits
(distributed/shm_all_reduce.py, `enable_shared_memory`), else through gloo; over several machines each node sums in
shared memory and the nodes' first ranks sum those over gloo. `busy_s` adds up the time spent in
collectives (waiting for the other ranks included): benchmarks/tensor_parallel.py reports it per step.
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.distributed.shm_all_reduce import ShmAllReduce, shm_all_reduce_available


class Communicator:
    def __init__(self, rank: int, world_size: int, timeout_s: float = 120.0,
                 device: torch.device | None = None) -> None:
        """device: where this rank's collective buffers live (its GPU under NCCL; the CPU under gloo)."""
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.device = device if device is not None else torch.device("cpu")
        self.busy_s = 0.0
        self.shm: ShmAllReduce | None = None  # over this node's ranks
        self.leaders: Any = None  # over several nodes: the process group of each node's first rank
        self.local_rank = rank

    @property
    def spans_nodes(self) -> bool:
        """Shared memory reaches only this node's ranks: sums also cross nodes (over the leaders' gloo group)."""
        return self.leaders is not None

    def enable_shared_memory(self, capacity: int, ranks_per_node: int | None = None) -> bool:
        """Collective (every rank calls it): sums of up to `capacity` float32 elements go through shared memory from
        now on, where this machine allows. With ranks_per_node < world_size (consecutive ranks per node, torchrun's
        layout) each node sums in shared memory and the nodes' first ranks over gloo. Returns whether they do."""
        per_node = ranks_per_node or self.world_size
        if self.world_size == 1 or self.shm is not None or per_node == 1:
            return self.shm is not None
        nnodes = self.world_size // per_node
        node_groups, leaders = [None], None  # one node: the default group is the node's
        if nnodes > 1:  # every rank creates every group, in the same order (torch.distributed's rule for new_group)
            node_groups = [dist.new_group(list(range(n * per_node, (n + 1) * per_node))) for n in range(nnodes)]
            leaders = dist.new_group([n * per_node for n in range(nnodes)])
        usable = torch.tensor([int(shm_all_reduce_available())], dtype=torch.int64)
        dist.all_reduce(usable, op=dist.ReduceOp.MIN)  # all or none
        if usable.item():
            node = self.rank // per_node
            self.local_rank = self.rank - node * per_node
            self.shm = ShmAllReduce(self.local_rank, per_node, capacity, self.timeout_s, group=node_groups[node],
                                    group_src=node * per_node)
            self.leaders = leaders
        return self.shm is not None

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks (x itself in a world of one)."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        total = x.float() if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" else x.clone()
        total = total.contiguous()
        if self.shm is not None and self.shm.fits(total):
            self.shm.all_reduce_(total)  # this node's sum
            if self.leaders is not None:  # the nodes' sums over gloo, then back to every rank of the node
                if self.local_rank == 0:
                    dist.all_reduce(total, group=self.leaders)
                else:
                    total.zero_()
                self.shm.all_reduce_(total)
        else:
            dist.all_reduce(total)
        self.busy_s += time.perf_counter() - start
        return total.to(x.dtype)

    def _gathered(self, x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor] | None:
        """Every rank's x padded to max(sizes) along the last dimension, float32 (the ranks' products may differ in
        output dtype: each rank plans its own kernels), in rank order: on rank 0 (on every rank where it went through
        shared memory, when it fits a slot), else None. Shared memory where it fits, else gloo."""
        x = x.float()
        width = max(sizes)
        padded = (x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))).contiguous()
        if self.shm is not None and not self.spans_nodes and padded.numel() <= self.shm.capacity:
            return list(self.shm.all_gather(padded).view(self.world_size, *padded.shape))
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(padded, gathered, dst=0)
        return gathered

    def gather_last_to_first(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor | None:
        """On rank 0 the ranks' x [..., sizes[rank]] joined along the last dimension in rank order, in float32; None on
        the other ranks (x itself in a world of one)."""
        if self.world_size == 1:
            return x
        start = time.perf_counter()
        parts = self._gathered(x, sizes)
        self.busy_s += time.perf_counter() - start
        if self.rank != 0 or parts is None:
            return None
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's obj on every rank (pickled)."""
        if self.world_size == 1:
            return obj
        start = time.perf_counter()
        if self.shm is not None and not self.spans_nodes:  # the bytes through shared memory; gloo beyond a slot
            data = self.shm.broadcast_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == 0
                                            else None)
            if data is not None:
                self.busy_s += time.perf_counter() - start
                return obj if self.rank == 0 else pickle.loads(data)
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        self.busy_s += time.perf_counter() - start
        return box[0]


SINGLE = Communicator(0, 1)


def init_communicator(rank: int, world_size: int, master_addr: str, master_port: int, backend: str,
                      timeout_s: float, device: torch.device | None = None) -> Communicator:
    """Joins (rank 0: opens) the rendezvous at master_addr:master_port; a collective that waits longer than timeout_s
    for a rank fails instead of hanging. Under NCCL `device` is the rank's GPU, made the current device first."""
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return Communicator(rank, world_size, timeout_s, device)


def close_communicator() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
