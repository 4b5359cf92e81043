"""The tensor-parallel ranks' collectives through shared memory (kernels/cpu/shm_all_reduce.h: all-reduce, all-gather,
broadcast of bytes), for ranks on one machine: a cache-line handshake where gloo makes socket round trips
(benchmarks/all_reduce.py: 7 us against 700 us for one row).

The segment is a file under /dev/shm that rank 0 creates and every rank maps; once all have mapped it (a gloo
barrier), rank 0 unlinks the name, so nothing is left behind whatever happens to the processes later.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.kernels.cpu.build import load_kernel_library

_SHM_DIR = "/dev/shm"


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("shm_all_reduce")
    if lib is None:
        return None
    lib.tm_shm_segment_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.tm_shm_segment_bytes.restype = ctypes.c_int64
    lib.tm_shm_all_reduce.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_uint64, ctypes.c_double]
    lib.tm_shm_all_reduce.restype = ctypes.c_int
    lib.tm_shm_all_gather.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_double]
    lib.tm_shm_all_gather.restype = ctypes.c_int
    lib.tm_shm_broadcast.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_uint64, ctypes.c_double]
    lib.tm_shm_broadcast.restype = ctypes.c_int
    return lib


def shm_all_reduce_available() -> bool:
    return _lib() is not None and os.path.isdir(_SHM_DIR)


class ShmAllReduce:
    """Sums float32 CPU tensors of up to `capacity` elements over the ranks of one machine; made collectively (every
    rank of `group` calls the constructor, after torch.distributed is initialised). `rank` and `world_size` count
    within the group, whose first member (global rank `group_src`) creates the segment; default: the whole world."""

    def __init__(self, rank: int, world_size: int, capacity: int, timeout_s: float, group: Any = None,
                 group_src: int = 0) -> None:
        lib = _lib()
        if lib is None:
            raise RuntimeError("the shared-memory all-reduce kernel is not available (no C compiler?)")
        self.rank, self.world_size, self.capacity, self.timeout_s = rank, world_size, capacity, timeout_s
        nbytes = lib.tm_shm_segment_bytes(world_size, capacity)
        name = None
        if rank == 0:
            fd, name = tempfile.mkstemp(prefix="tokenmill-tp-", dir=_SHM_DIR)
            os.ftruncate(fd, nbytes)  # zero-filled: every control line starts at sequence 0
            os.close(fd)
        box = [name]
        dist.broadcast_object_list(box, src=group_src, group=group)
        with open(box[0], "r+b") as f:
            self._map = mmap.mmap(f.fileno(), nbytes)
        # This rank's process id after its sequence number: a rank waiting on this one fails at once if it dies.
        self._map[rank * 64 + 8 : rank * 64 + 16] = os.getpid().to_bytes(8, "little")
        dist.barrier(group=group)  # every rank has mapped it: the name can go
        if rank == 0:
            os.unlink(box[0])
        self._segment = torch.frombuffer(self._map, dtype=torch.uint8)
        self.address = self._segment.data_ptr()
        # The calls so far; the C forward (kernels/cpu/step_forward.c) counts its own all-reduces in it too.
        self.seq = torch.zeros(1, dtype=torch.int64)
        self._received = torch.empty(capacity * 4 - 8, dtype=torch.uint8)  # a broadcast's bytes, on ranks > 0
        self._length = ctypes.c_int64(0)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and x.numel() <= self.capacity

    def all_reduce_(self, x: torch.Tensor) -> None:
        """x (it must fit) becomes the sum of the ranks' x, the same bits on every rank."""
        seq = self._next()
        self._check(_lib().tm_shm_all_reduce(self.address, self.rank, self.world_size, self.capacity, x.data_ptr(),
                                             x.numel(), seq, self.timeout_s), seq, x.numel())

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world_size, x.numel()]: every rank's x (it must fit), on every rank."""
        out = torch.empty(self.world_size, x.numel(), dtype=torch.float32)
        seq = self._next()
        self._check(_lib().tm_shm_all_gather(self.address, self.rank, self.world_size, self.capacity, x.data_ptr(),
                                             x.numel(), out.data_ptr(), seq, self.timeout_s), seq, x.numel())
        return out

    def broadcast_bytes(self, data: bytes | None) -> bytes | None:
        """Rank 0's data on every rank (rank 0 passes it, the others None); None everywhere when it is larger than
        a slot (the caller then sends it another way)."""
        seq = self._next()
        if self.rank == 0:
            assert data is not None
            self._length.value = len(data)
            self._check(_lib().tm_shm_broadcast(self.address, 0, self.world_size, self.capacity, data,
                                                ctypes.byref(self._length), seq, self.timeout_s), seq, 0)
            return data if len(data) <= self._received.numel() else None
        self._check(_lib().tm_shm_broadcast(self.address, self.rank, self.world_size, self.capacity,
                                            self._received.data_ptr(), ctypes.byref(self._length), seq,
                                            self.timeout_s), seq, 0)
        n = self._length.value
        return None if n < 0 else self._received[:n].numpy().tobytes()

    def _next(self) -> int:
        self.seq += 1
        return int(self.seq.item())

    def _check(self, code: int, seq: int, numel: int) -> None:
        if code == 2:
            raise TimeoutError(f"a tensor-parallel rank did not reach collective {seq} within "
                               f"{self.timeout_s:.0f} s")
        if code == 3:
            raise RuntimeError(f"a tensor-parallel rank's process is gone (collective {seq})")
        if code != 0:
            raise ValueError(f"a collective of {numel} elements exceeds the segment's {self.capacity}")
