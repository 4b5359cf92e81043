"""The K/V cache element types the CPU kernels take (kv_cache.h): float32, or float16 (`--kv-cache-dtype
float16`), converted to float32 as the kernels read it."""

from __future__ import annotations

import torch

KV_DTYPES = (torch.float32, torch.float16)


def kv_f16_flag(kv_cache: tuple[torch.Tensor, torch.Tensor]) -> int:
    """The kernels' kv_f16 argument for these caches (1: float16); ValueError unless both are contiguous CPU
    tensors of one dtype in KV_DTYPES."""
    k_cache, v_cache = kv_cache
    if (k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype or k_cache.shape != v_cache.shape
            or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.device.type != "cpu"):
        raise ValueError(f"the CPU kernels take contiguous float32 or float16 K/V caches of one dtype and shape, "
                         f"got {k_cache.dtype} / {v_cache.dtype}")
    return int(k_cache.dtype == torch.float16)
