"""ctypes binding of int4_gemm.c: W4A16 products for decode-sized row counts (activations quantized per
group of 32 in the call), bf16 products over panels dequantized pass by pass for many rows, and the dequantization
of the 4-bit weights to float32."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from tokenmill.kernels.cpu.build import load_kernel_library

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("int4_gemm")
    if lib is None:
        return None
    lib.tm_int4_gemm_small.argtypes = [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.tm_int4_gemm_small.restype = _int
    lib.tm_int4_dequantize.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _int]
    lib.tm_int4_dequantize.restype = None
    lib.tm_int4_bf16_gemm.argtypes = [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.tm_int4_bf16_gemm.restype = _int
    lib.tm_int4_bf16_panels.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64]
    lib.tm_int4_bf16_panels.restype = None
    return lib


def int4_gemm_available() -> bool:
    return _lib() is not None


def check_int4_weights(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int, k: int) -> None:
    """The layout int4_dot.h reads: packed [n_pad, k / 2] uint8, d and m [n_pad / 4, k / 32, 4] float16."""
    n_pad = (n + 3) // 4 * 4
    if k % 64:
        raise ValueError(f"int4 weights need in_features % 64 == 0, got {k}")
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (n_pad, k // 2) or not packed.is_contiguous():
        raise ValueError(f"int4 packed weights must be contiguous uint8 [{n_pad}, {k // 2}], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    for t, what in ((d, "scales"), (m, "minima")):
        if t.dtype != torch.float16 or tuple(t.shape) != (n_pad // 4, k // 32, 4) or not t.is_contiguous():
            raise ValueError(f"int4 group {what} must be contiguous float16 [{n_pad // 4}, {k // 32}, 4], got "
                             f"{t.dtype} {tuple(t.shape)}")


def _rows_product(name: str, kernel: Callable[..., int], x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor,
                  m: torch.Tensor, n: int, scratch: str) -> torch.Tensor:
    """y [M, n] float32 from one of int4_gemm.c's products of x [M, K] float32 rows (columns contiguous) by the
    4-bit weights; name and scratch (what its buffers hold) word the errors."""
    num_rows, k = x.shape
    if x.dtype != torch.float32 or x.stride(1) != 1:
        raise ValueError(f"{name}: x must be float32 [M, K] with contiguous rows, got {x.dtype} "
                         f"strides {x.stride()}")
    check_int4_weights(packed, d, m, n, k)
    y = x.new_empty(num_rows, n)
    status = kernel(y.data_ptr(), x.data_ptr(), x.stride(0), packed.data_ptr(), d.data_ptr(), m.data_ptr(), num_rows,
                    n, k, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"{name}: no memory for {num_rows} x {k} {scratch}")
    return y


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided, columns contiguous) -> [M, n] float32 ~= x @ W^T for the
    4-bit weights W (check_int4_weights' layout), each group of 32 input values of a row quantized to
    16 bits over its own max |x| (int4_dot.h)."""
    return _rows_product("int4_gemm", _lib().tm_int4_gemm_small, x, packed, d, m, n, "quantized activations")


def int4_bf16_gemm(x: torch.Tensor, packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided, columns contiguous) -> [M, n] float32 = bf16(x) @ bf16(W)^T, sums in
    float32, for the 4-bit weights W (check_int4_weights' layout) dequantized to bf16 panels pass by pass
    (int4_bf16.h). Fast only where the CPU multiplies bf16 (AVX512-BF16, AMX-BF16)."""
    return _rows_product("int4_bf16_gemm", _lib().tm_int4_bf16_gemm, x, packed, d, m, n, "bf16 activations")


def int4_bf16_panels(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The bf16 panels (kernels/cpu/bf16_panels.h's layout, [ceil(n / 16), k / 2, 16, 2]) int4_bf16_gemm multiplies."""
    check_int4_weights(packed, d, m, n, k)
    panels = torch.empty((n + 15) // 16, k // 2, 16, 2, dtype=torch.bfloat16)
    _lib().tm_int4_bf16_panels(panels.data_ptr(), packed.data_ptr(), d.data_ptr(), m.data_ptr(), n, k)
    return panels


def int4_dequantize(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 weights [n, k] = d * q + m that int4_gemm multiplies by."""
    check_int4_weights(packed, d, m, n, k)
    w = torch.empty(n, k, dtype=torch.float32)
    _lib().tm_int4_dequantize(w.data_ptr(), packed.data_ptr(), d.data_ptr(), m.data_ptr(), n, k,
                              torch.get_num_threads())
    return w
