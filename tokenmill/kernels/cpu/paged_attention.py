"""ctypes binding of paged_attention.c: decode attention reading the head-major paged KV in place."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.bf16_gemm import bf16_amx_ready
from tokenmill.kernels.cpu.build import cpu_flags, load_kernel_library
from tokenmill.kernels.cpu.kv_cache import cache_head_dim, kv_type_code

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def _kernel() -> ctypes._CFuncPtr | None:
    lib = load_kernel_library("paged_attention")
    if lib is None:
        return None
    fn = lib.tm_paged_decode_attention
    fn.argtypes = [_ptr] * 4 + [ctypes.c_int] + [_ptr] * 3 + [_i64] * 7 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def decode_kernel_available() -> bool:
    return _kernel() is not None


def bf16_cache_products(block_size: int, head_dim: int) -> bool:
    """Whether the decode kernels multiply a bfloat16 cache's tiles as they lie, on AVX512-BF16 (attention_tile.h's
    bf16_products: the kernels are built with -march=native, so the CPU's flag decides), rather than unpacking them
    to float32 rows first."""
    return (block_size % 16 == 0 and head_dim % 32 == 0 and "avx512_bf16" in cpu_flags().split()
            and decode_kernel_available())


def bf16_cache_on_amx(num_heads: int, num_kv_heads: int, block_size: int, head_dim: int) -> bool:
    """Whether the decode kernels multiply a bfloat16 cache's tiles on AMX tiles (bf16_decode_amx.h's
    amx_decode_fits: at most 16 query heads per KV head, blocks of 16 or 32, head_dim % 64 == 0, AMX-BF16 and
    AVX512-BF16, and this process granted the tile state: bf16_amx_ready, the check amx_decode_fits makes), rather
    than on vdpbf16ps."""
    return (num_heads // num_kv_heads <= 16 and block_size in (16, 32) and head_dim % 64 == 0
            and bf16_amx_ready() and bf16_cache_products(block_size, head_dim))


def paged_decode_attention(
    out: torch.Tensor, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
) -> None:
    """For each request r: out[rows[r]] = softmax(q k^T * scale) v over its first seq_lens[r] cached
    positions. query/out: [T, H, D] float32 contiguous; caches [Hkv, num_blocks, block_size, row] float32,
    float16 or int8 (kernels/cpu/kv_cache.py);
    rows, seq_lens: [R] int64; block_tables: [R', max_blocks] int64 contiguous, row r for request r."""
    fn = _kernel()
    if fn is None:
        raise RuntimeError("the CPU paged attention kernel is not available (no C compiler?)")
    k_cache, v_cache = kv_cache
    kv_type = kv_type_code(kv_cache)
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    head_dim = query.shape[2]
    if cache_head_dim(k_cache) != head_dim:
        raise ValueError(f"paged_decode_attention: the cache holds heads of {cache_head_dim(k_cache)}, "
                         f"the query {head_dim}")
    for t in (out, query):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("paged_decode_attention takes contiguous float32 CPU queries and outputs")
    for t in (rows, seq_lens, block_tables):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError("rows, seq_lens and block_tables must be contiguous int64")
    failed = fn(
        out.data_ptr(), query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kv_type, rows.data_ptr(),
        seq_lens.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], rows.shape[0], query.shape[1],
        num_kv_heads, num_blocks, block_size, head_dim, scale, torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("paged_decode_attention could not allocate its score buffer")
