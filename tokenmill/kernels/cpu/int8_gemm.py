"""ctypes binding of int8_gemm.c: W8A8 products for decode-sized row counts, per-token activation
quantization fused in."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("int8_gemm")
    if lib is None:
        return None
    lib.tm_int8_gemm_small.argtypes = [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.tm_int8_gemm_small.restype = _int
    return lib


def int8_gemm_available() -> bool:
    return _lib() is not None


def int8_row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> [N] int32 sums of each row (the kernel's zero-point correction)."""
    return qweight.sum(dim=1, dtype=torch.int32)


def int8_gemm(
    x: torch.Tensor, qweight: torch.Tensor, row_sums: torch.Tensor, scale: torch.Tensor, rotation_block: int = 0
) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided, columns contiguous); qweight [N, K] int8 contiguous whose
    input-channel pairs obey |q[2j]| + |q[2j+1]| <= 128; row_sums = int8_row_sums(qweight); scale [N]
    float32. Returns [M, N] float32 ~= x' @ (qweight * scale[:, None]).T, each row of x' quantized to
    8 bits over its own [min, max], where x' = x, or with rotation_block = b (a power of 2 dividing K)
    every b consecutive columns of x multiplied by the orthonormal b x b Hadamard matrix."""
    num_rows, k = x.shape
    n = qweight.shape[0]
    if x.dtype != torch.float32 or x.stride(1) != 1 or qweight.shape[1] != k:
        raise ValueError(f"int8_gemm: x must be float32 [M, {qweight.shape[1]}] with contiguous rows, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    if rotation_block < 0 or (rotation_block and (rotation_block & (rotation_block - 1) or k % rotation_block)):
        raise ValueError(f"int8_gemm: rotation_block must be 0 or a power of 2 dividing {k}, got {rotation_block}")
    y = x.new_empty(num_rows, n)
    status = _lib().tm_int8_gemm_small(
        y.data_ptr(), x.data_ptr(), x.stride(0), rotation_block, qweight.data_ptr(), row_sums.data_ptr(),
        scale.data_ptr(), num_rows, n, k, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"int8_gemm: no memory for {num_rows} x {k} quantized activations")
    return y
