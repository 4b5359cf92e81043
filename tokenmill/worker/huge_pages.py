"""Transparent huge pages (2 MiB) for the CPU engine's large, long-lived memory: weights and the KV cache.

Why: on the 2-core machine a batch-1 decode step streams every weight once and a large decode step
streams the KV cache in 4 KiB tiles at random places; with 4 KiB pages each page is a TLB miss and a
stop for the hardware prefetcher (benchmarks/huge_pages.py measures both). Most Linux systems run THP in
"madvise" mode, so memory gets huge pages only when asked:

- `weight_arena(model)` copies every CPU tensor the model's modules hold (parameters, buffers, tensor
  attributes such as packed panels, also inside tuples and lists) into one 2 MiB-aligned arena advised
  MADV_HUGEPAGE, and repoints each tensor object in place (Tensor.set_), so every reference to it, tied
  weights included, sees the arena. Individual projections are 0.5-2 MiB, too small to sit in huge pages
  by themselves. Must run before anything captures raw data pointers (the C forward does, at attach).
- `prefaulted_zeros(nbytes, huge_pages)` is a zero-filled byte tensor (the KV cache) whose every page is mapped
  at start-up, so that no step ever stalls on a page fault. Mapping a huge page can cost far more than zeroing
  it: with THP defrag "madvise" the kernel compacts memory first (measured on the AMX Xeon VM: 5.4 ms per
  2 MiB page, 5.9 s for a 2.2 GiB cache, against 0.26 s in 4 KiB pages; faulted during serving, one decode
  step that entered new blocks of every layer took 340 ms instead of 11). So the first pages are timed, and
  where they are slow the rest of the buffer keeps 4 KiB pages.

Where madvise is missing (not Linux) or refused (THP disabled) both still return correct memory, only
without huge pages; weight_arena says which (the worker logs it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import time

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("tokenmill")

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_ALIGN = 64  # every tensor in the arena starts on a cache line


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _advise_aligned(buffer: np.ndarray) -> bool:
    """MADV_HUGEPAGE on the whole 2 MiB pages inside `buffer`; False when none or refused."""
    fn = _madvise()
    start = buffer.ctypes.data
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = (start + buffer.nbytes) // HUGE_PAGE * HUGE_PAGE
    if fn is None or last <= first:
        return False
    return fn(first, last - first, _MADV_HUGEPAGE) == 0


def _aligned_bytes(nbytes: int) -> tuple[torch.Tensor, bool]:
    """A uint8 tensor of nbytes starting on a 2 MiB boundary (calloc'd, so untouched pages cost nothing),
    advised MADV_HUGEPAGE; and whether the advice was taken."""
    raw = np.zeros(nbytes + HUGE_PAGE, dtype=np.uint8)
    offset = -raw.ctypes.data % HUGE_PAGE
    view = raw[offset : offset + nbytes]  # keeps `raw` alive through .base
    advised = _advise_aligned(view)
    return torch.from_numpy(view), advised


_MADV_NOHUGEPAGE = 15
_PAGE = 4096
# Time to map one 2 MiB page above which the KV cache keeps 4 KiB pages (zeroing 2 MiB takes ~0.2 ms).
SLOW_HUGE_PAGE_S = 1e-3
_PROBE_PAGES = 8


def prefaulted_zeros(nbytes: int, huge_pages: bool) -> tuple[torch.Tensor, bool]:
    """A zero-filled uint8 CPU tensor of nbytes with every page mapped now, and whether it sits in huge pages:
    asked for (huge_pages), granted, and fast enough to map (the first _PROBE_PAGES are timed)."""
    if not huge_pages:
        buffer, advised = torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)), False
    else:
        buffer, advised = _aligned_bytes(nbytes)
    array = buffer.numpy()
    probe = 0
    if advised and _huge_pages_slow is None and nbytes > _PROBE_PAGES * HUGE_PAGE:
        probe = _PROBE_PAGES * HUGE_PAGE
        start = time.perf_counter()
        array[:probe:_PAGE] = 0
        _judge_huge_pages((time.perf_counter() - start) / _PROBE_PAGES)
    if advised and _huge_pages_slow:
        fn = _madvise()
        advised = fn is None or fn(array.ctypes.data + probe, nbytes - probe, _MADV_NOHUGEPAGE) != 0
    array[::_PAGE] = 0  # maps every page (the OS zero-fills it); the values stay zeros
    return buffer, advised


_huge_pages_slow: bool | None = None  # this process's verdict, from the first buffer probed


def _judge_huge_pages(seconds_per_page: float) -> None:
    global _huge_pages_slow
    _huge_pages_slow = seconds_per_page > SLOW_HUGE_PAGE_S
    if _huge_pages_slow:
        logger.info("mapping a 2 MiB page took %.1f ms here (THP defrag): the KV cache keeps 4 KiB pages",
                    seconds_per_page * 1e3)


def _module_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every distinct CPU tensor object the modules hold: parameters, buffers, tensor attributes, and
    tensors inside tuple or list attributes."""
    found: dict[int, torch.Tensor] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and not value.is_sparse:
                found.setdefault(id(value), value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    for module in model.modules():
        for value in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()):
            visit(value)
    return list(found.values())


@torch.no_grad()
def weight_arena(model: nn.Module) -> tuple[int, bool]:
    """Moves the model's CPU tensors into one huge-page arena (see the module doc); returns (bytes moved,
    whether the huge-page advice was taken). Values, shapes, strides and sharing are unchanged."""
    tensors = _module_tensors(model)
    storages: dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage())
    offsets: dict[int, int] = {}
    total = 0
    for ptr, storage in storages.items():
        offsets[ptr] = total
        total += -(-storage.nbytes() // _ALIGN) * _ALIGN
    if total == 0:
        return 0, False
    arena, advised = _aligned_bytes(total)
    arena_storage = arena.untyped_storage()
    for ptr, storage in storages.items():
        start = offsets[ptr]
        arena[start : start + storage.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
    for t in tensors:
        base = offsets[t.untyped_storage().data_ptr()]
        itemsize = t.element_size()
        # base is a multiple of 64 and so of every itemsize: the storage offset stays whole in elements
        t.set_(arena_storage, base // itemsize + t.storage_offset(), t.size(), t.stride())
    return total, advised
