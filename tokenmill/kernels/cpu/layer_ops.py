"""ctypes bindings of layer_ops.c: fused RMSNorm (+ residual add), SiLU-and-mul, rotary + K/V write, rows' argmax.

Each function takes float32 CPU tensors; `applies()` says whether a tensor qualifies, and callers keep
their torch path for everything else (other dtypes, no C compiler). The *_bf16 variants serve bfloat16
models: bf16 activations in and out, a float32 residual stream and float32 arithmetic (`applies_bf16()`).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library
from tokenmill.kernels.cpu.kv_cache import cache_head_dim, kv_type_code

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("layer_ops")
    if lib is None:
        return None
    lib.tm_rms_norm.argtypes = [_ptr, _ptr, _ptr, _ptr, _f32, _i64, _i64, _int]
    lib.tm_silu_and_mul.argtypes = [_ptr, _ptr, _i64, _i64, _int]
    lib.tm_rotary_write_kv.argtypes = [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _int, _ptr] + [_i64] * 6 + [_int]
    lib.tm_rms_norm_bf16.argtypes = [_ptr, _ptr, _int, _ptr, _ptr, _f32, _i64, _i64, _int]
    lib.tm_silu_and_mul_bf16.argtypes = [_ptr, _ptr, _i64, _i64, _int]
    lib.tm_rows_argmax.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _int]
    for fn in (lib.tm_rms_norm, lib.tm_silu_and_mul, lib.tm_rotary_write_kv, lib.tm_rms_norm_bf16,
               lib.tm_silu_and_mul_bf16, lib.tm_rows_argmax):
        fn.restype = None
    return lib


def layer_ops_available() -> bool:
    return _lib() is not None


def applies(x: torch.Tensor) -> bool:
    """x can go to these kernels: float32, on the CPU, contiguous."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()


def applies_bf16(x: torch.Tensor) -> bool:
    """x can go to the *_bf16 kernels: bfloat16, on the CPU, contiguous."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous()


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 norm(x) * weight for a bf16 model; x bf16 or float32, weight float32, residual float32 (+= x in
    place first, then normalized)."""
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    hidden = x.shape[-1]
    _lib().tm_rms_norm_bf16(
        out.data_ptr(), x.data_ptr(), int(x.dtype == torch.bfloat16),
        None if residual is None else residual.data_ptr(), weight.data_ptr(), eps, x.numel() // hidden, hidden,
        torch.get_num_threads())
    return out


def silu_and_mul_bf16(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] of bf16 x, computed in float32, rounded to bf16."""
    width = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], width)
    _lib().tm_silu_and_mul_bf16(out.data_ptr(), x.data_ptr(), x.numel() // x.shape[-1], width,
                                torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x) * weight, or with residual: residual += x in place, then norm(residual) * weight."""
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    _lib().tm_rms_norm(
        out.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), eps,
        x.numel() // hidden, hidden, torch.get_num_threads())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:]."""
    width = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], width)
    _lib().tm_silu_and_mul(out.data_ptr(), x.data_ptr(), x.numel() // x.shape[-1], width, torch.get_num_threads())
    return out


def rotary_write_kv(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """qkv: [T, >= (num_heads + 2 * num_kv_heads) * head_dim] contiguous; cos/sin: [T, head_dim].
    Rotates k in place inside qkv, stores k and v at their slots of the head-major cache
    ([num_kv_heads, num_blocks, block_size, row], float32, or float16 / int8 rows or bfloat16 pair-interleaved tiles
    (kernels/cpu/kv_cache.py, head_dim % 8 == 0) rounded to nearest) and returns the rotated q, [T, num_heads,
    head_dim]."""
    kv_type = kv_type_code(kv_cache)
    if kv_type and head_dim % 8:
        raise ValueError(f"a {kv_cache[0].dtype} K/V cache needs head_dim % 8 == 0, got {head_dim}")
    if cache_head_dim(kv_cache[0]) != head_dim:
        raise ValueError(f"rotary_write_kv: the cache holds heads of {cache_head_dim(kv_cache[0])}, not {head_dim}")
    k_cache, v_cache = kv_cache
    num_rows = qkv.shape[0]
    q = qkv.new_empty(num_rows, num_heads, head_dim)
    slots_per_head = k_cache.shape[1] * k_cache.shape[2]
    _lib().tm_rotary_write_kv(
        q.data_ptr(), qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), kv_type, slot_mapping.data_ptr(), num_rows, num_heads, num_kv_heads, head_dim,
        slots_per_head, k_cache.shape[2], torch.get_num_threads())
    return q


def rows_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's largest value of x [R, V]: torch's x.max(dim=-1) (the first index of the
    maximum, argmax's), from the C kernel where x applies (float32 CPU, contiguous) and every row is finite; else
    torch's reduction (which propagates NaN). On the Zen 4, [64, 49152] rows 0.21 against 1.35 ms
    (benchmarks/rows_max.py)."""
    lib = _lib()
    if lib is None or not applies(x) or x.dim() != 2 or x.shape[1] == 0:
        values, ids = x.max(dim=-1)
        return values, ids
    ids = torch.empty(x.shape[0], dtype=torch.int64)
    values = torch.empty(x.shape[0], dtype=torch.float32)
    lib.tm_rows_argmax(ids.data_ptr(), values.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1], torch.get_num_threads())
    if bool((ids < 0).any()):
        values, ids = x.max(dim=-1)
    return values, ids
