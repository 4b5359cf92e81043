"""The K/V cache element types the CPU kernels take (kv_cache.h), and the torch reference of the int8 rows.

float32, float16 or int8 (`--kv-cache-dtype`). An int8 cache stores, per position and KV head, head_dim int8
values q and their float32 scale s in the 4 bytes after them (x ~= s * q, s = max |x| * (1 / 127), q rounded
to nearest even; kv_cache.h), so its tensors are [num_kv_heads, num_blocks, block_size, head_dim + 4] int8: a
quarter of float32's bytes plus the scale.
"""

from __future__ import annotations

import torch

KV_DTYPES = (torch.float32, torch.float16, torch.int8)

# kv_cache.h's kv_type codes.
KV_TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.int8: 2}

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
        raise ValueError(f"the CPU kernels take contiguous float32, float16 or int8 K/V caches of one dtype and "
                         f"shape, got {k_cache.dtype} / {v_cache.dtype}")
    return KV_TYPE_CODES[k_cache.dtype]


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
