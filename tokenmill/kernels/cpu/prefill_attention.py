"""ctypes binding of prefill_attention.c: causal attention of prompt rows over the head-major paged KV
cache, read in place."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library
from tokenmill.kernels.cpu.kv_cache import cache_head_dim, kv_type_code

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:
    lib = load_kernel_library("prefill_attention")
    if lib is None:
        return None
    fn = lib.tm_prefill_attention
    fn.argtypes = ([_ptr, _ptr, _i64, _ptr, _ptr, ctypes.c_int, _ptr, _ptr, _ptr, _ptr] + [_i64] * 7
                   + [ctypes.c_float, ctypes.c_int])
    fn.restype = ctypes.c_int
    return fn


def prefill_kernel_available() -> bool:
    return _kernel() is not None


def paged_prefill_attention(
    out: torch.Tensor, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], q_starts: torch.Tensor,
    q_lens: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
) -> None:
    """For each request r, rows q_starts[r] .. + q_lens[r] - 1 of out = causal softmax(q k^T * scale) v, row j
    at position seq_lens[r] - q_lens[r] + j seeing the cached positions up to its own. query: [T, H, D] float32
    (rows may be strided, heads contiguous); out: [T, H, D] float32 contiguous; caches [Hkv, num_blocks,
    block_size, row] float32, float16 or int8 (kernels/cpu/kv_cache.py) holding every position; q_starts, q_lens,
    seq_lens: [R] int64; block_tables: [R, max_blocks] int64 contiguous, row r for request r."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError("the CPU prefill attention kernel is not available (no C compiler?)")
    k_cache, v_cache = kv_cache
    kv_type = kv_type_code(kv_cache)
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    head_dim = cache_head_dim(k_cache)
    num_heads = query.shape[1]
    if (query.dtype != torch.float32 or query.stride(2) != 1 or query.stride(1) != head_dim
            or not out.is_contiguous() or out.shape != query.shape or num_heads % num_kv_heads or head_dim % 8):
        raise ValueError("paged_prefill_attention: float32 query [T, H, D] with contiguous heads, a contiguous out "
                         "of the same shape, H a multiple of Hkv and D of 8")
    for t in (q_starts, q_lens, seq_lens, block_tables):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("paged_prefill_attention: index tensors must be contiguous int64")
    status = fn(out.data_ptr(), query.data_ptr(), query.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), kv_type,
                q_starts.data_ptr(), q_lens.data_ptr(), seq_lens.data_ptr(), block_tables.data_ptr(),
                block_tables.shape[1], q_starts.shape[0], num_heads, num_kv_heads, num_blocks, block_size, head_dim,
                scale, torch.get_num_threads())
    if status == 1:
        raise MemoryError("paged_prefill_attention: no memory for the scratch buffers")
    if status != 0:
        raise RuntimeError(f"paged_prefill_attention failed with status {status}")
