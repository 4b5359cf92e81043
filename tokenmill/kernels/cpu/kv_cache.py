"""The K/V cache element types the CPU kernels take (kv_cache.h), and the torch reference of their layouts.

float32, float16, int8 or bfloat16 (`--kv-cache-dtype`). An int8 cache stores, per position and KV head, head_dim
int8 values q and their float32 scale s in the 4 bytes after them (x ~= s * q, s = max |x| * (1 / 127), q rounded
to nearest even; kv_cache.h), so its tensors are [num_kv_heads, num_blocks, block_size, head_dim + 4] int8: a
quarter of float32's bytes plus the scale.

A bfloat16 cache has the shape of the others, [num_kv_heads, num_blocks, block_size, head_dim], but each (KV head,
block) tile holds its values interleaved in pairs, the operand order of the bf16 dot-product instructions (AVX512-BF16
vdpbf16ps, AMX-BF16 B tiles), so that the kernels multiply the cache as it lies: K tiles [head_dim / 2][block_size][2]
(a position's dims d, d + 1 side by side, each dim pair running down the positions), V tiles [block_size / 2][head_dim]
[2] (positions j, j + 1 side by side, each position pair running across the dims). write_kv_rows and tiles_as_rows
are that layout's writer and reader for the torch paths; block_size and head_dim must be even.
"""

from __future__ import annotations

import functools

import torch

KV_DTYPES = (torch.float32, torch.float16, torch.int8, torch.bfloat16)

# kv_cache.h's kv_type codes.
KV_TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.int8: 2, torch.bfloat16: 3}

# Bytes of an int8 row's scale (one float32), after its head_dim values.
INT8_SCALE_BYTES = 4


def kv_row_width(dtype: torch.dtype, head_dim: int) -> int:
    """Last-dim size of a cache of `dtype` for heads of head_dim: the int8 rows carry their scale."""
    return head_dim + INT8_SCALE_BYTES if dtype == torch.int8 else head_dim


def kv_type_code(kv_cache: tuple[torch.Tensor, torch.Tensor]) -> int:
    """The kernels' kv_type argument for these caches; ValueError unless both are contiguous CPU tensors of
    one dtype in KV_DTYPES and one shape."""
    k_cache, v_cache = kv_cache
    if (k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype or k_cache.shape != v_cache.shape
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.device.type != "cpu"):
        raise ValueError(f"the CPU kernels take contiguous float32, float16, int8 or bfloat16 K/V caches of one "
                         f"dtype and shape, got {k_cache.dtype} / {v_cache.dtype}")
    if k_cache.dtype == torch.bfloat16:
        check_bf16_tiles(k_cache.shape[2], k_cache.shape[3])
    return KV_TYPE_CODES[k_cache.dtype]


def check_bf16_tiles(block_size: int, head_dim: int) -> None:
    """ValueError unless a bfloat16 cache's pair-interleaved tiles can hold blocks of block_size x head_dim."""
    if block_size % 2 or head_dim % 2:
        raise ValueError(f"a bfloat16 K/V cache interleaves pairs of positions and of dims: block_size and head_dim "
                         f"must be even, got {block_size} and {head_dim}")


@functools.cache
def bf16_tile_places(block_size: int, head_dim: int, is_value: bool, device: torch.device) -> torch.Tensor:
    """[block_size, head_dim] int64: where position j's element d lies in a bfloat16 K (is_value False) or V tile,
    flattened (kv_cache.h's bf16_index)."""
    j = torch.arange(block_size, device=device).unsqueeze(1)
    d = torch.arange(head_dim, device=device).unsqueeze(0)
    if is_value:
        return ((j // 2) * head_dim + d) * 2 + j % 2
    return ((d // 2) * block_size + j) * 2 + d % 2


def tiles_as_rows(tiles: torch.Tensor, is_value: bool) -> torch.Tensor:
    """Cache tiles [..., block_size, row] as stored -> the same positions' rows [..., block_size, row] in order
    (a bfloat16 cache's pairs de-interleaved; other dtypes are stored by rows and returned as they are)."""
    if tiles.dtype != torch.bfloat16:
        return tiles
    block_size, head_dim = tiles.shape[-2:]
    places = bf16_tile_places(block_size, head_dim, is_value, tiles.device).reshape(-1)
    return tiles.reshape(*tiles.shape[:-2], block_size * head_dim)[..., places].view(tiles.shape)


def write_kv_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, is_value: bool) -> None:
    """rows [num_kv_heads, n, head_dim] (values) into slots (block * block_size + position) of cache [num_kv_heads,
    num_blocks, block_size, row]: rounded to float16/bfloat16 or quantized to int8 rows as the cache's dtype says."""
    num_kv_heads, _, block_size, row_width = cache.shape
    if cache.dtype == torch.bfloat16:
        check_bf16_tiles(block_size, row_width)
        places = bf16_tile_places(block_size, row_width, is_value, cache.device)[slots % block_size]  # [n, D]
        places = places + (slots // block_size * (block_size * row_width)).unsqueeze(1)
        values = rows.to(torch.bfloat16).reshape(num_kv_heads, -1)
        cache.view(num_kv_heads, -1).index_copy_(1, places.reshape(-1), values)
        return
    rows = quantize_kv_rows(rows) if cache.dtype == torch.int8 else rows.to(cache.dtype)
    cache.view(num_kv_heads, -1, row_width).index_copy_(1, slots, rows)


def cache_head_dim(cache: torch.Tensor) -> int:
    """head_dim of a cache tensor [..., row]."""
    return cache.shape[-1] - INT8_SCALE_BYTES if cache.dtype == torch.int8 else cache.shape[-1]


def quantize_kv_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows x [..., head_dim] as int8 cache rows [..., head_dim + 4] (kv_cache.h's store_kv_row)."""
    x = x.float()
    # The float32 operations of kv_cache.h's store_kv_row, bit for bit: scale = amax * (1/127), inv = 1 / scale.
    scale = x.abs().amax(dim=-1, keepdim=True) * torch.tensor(1.0 / 127.0, dtype=torch.float32)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(x * inv).clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)  # the scale's 4 bytes after the values


def kv_values(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., row] as values [..., head_dim] of dtype (int8 rows dequantized with their scale)."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    head_dim = rows.shape[-1] - INT8_SCALE_BYTES
    scale = rows[..., head_dim:].contiguous().view(torch.float32)  # [..., 1]
    return (rows[..., :head_dim].float() * scale).to(dtype)
