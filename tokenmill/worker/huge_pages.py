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
- `huge_page_zeros(nbytes)` is a zero-filled byte tensor whose pages the OS maps on first touch, as
  huge pages: the KV cache, of which start-up writes nothing.

Where madvise is missing (not Linux) or refused (THP disabled) both still return correct memory, only
without huge pages; weight_arena says which (EngineCore logs it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import numpy as np
import torch
from torch import nn

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


def huge_page_zeros(nbytes: int) -> torch.Tensor:
    """Zero-filled uint8 CPU tensor of nbytes, mapped as huge pages on first touch where the OS agrees."""
    return _aligned_bytes(nbytes)[0]


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
