"""ctypes binding of int8_gemm.c: W8A8 products against int8 weights packed in 16-channel panels
(int8_panels.h), the per-token activation quantization fused in, and the packing."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int

PANEL, QUAD = 16, 4  # int8_panels.h
# Activation levels per token (int8_quantize.h): 8 bits, or 7 bits for int8_panels.h's faster paired tile.
ACTIVATION_LEVELS = {8: 255, 7: 127}


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("int8_gemm")
    if lib is None:
        return None
    lib.tm_int8_panels_gemm.argtypes = [_ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int]
    lib.tm_int8_panels_gemm.restype = _int
    lib.tm_int8_pack_panels.argtypes = [_ptr, _ptr, _i64, _i64]
    lib.tm_int8_pack_panels.restype = None
    return lib


def int8_gemm_available() -> bool:
    return _lib() is not None


def int8_panels_shape(n: int, k: int) -> tuple[int, int, int, int]:
    return ((n + PANEL - 1) // PANEL, (k + QUAD - 1) // QUAD, PANEL, QUAD)


def padded_channels(n: int) -> int:
    """Output channels rounded up to whole panels: the length of the scales and row sums."""
    return (n + PANEL - 1) // PANEL * PANEL


def pack_int8_panels(qweight: torch.Tensor) -> torch.Tensor:
    """[n, k] int8 -> panels [ceil(n / 16), ceil(k / 4), 16, 4]: weight (16 p + j, 4 g + t) at [p, g, j, t],
    zero past n and k."""
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"pack_int8_panels: weights must be an int8 matrix, got {qweight.dtype} {tuple(qweight.shape)}")
    qweight = qweight.contiguous()
    n, k = qweight.shape
    panels = torch.empty(int8_panels_shape(n, k), dtype=torch.int8)
    _lib().tm_int8_pack_panels(panels.data_ptr(), qweight.data_ptr(), n, k)
    return panels


def padded_row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """[n, k] int8 -> [padded_channels(n)] int32 sums of each row (the zero-point correction), zero past n."""
    sums = torch.zeros(padded_channels(qweight.shape[0]), dtype=torch.int32)
    sums[: qweight.shape[0]] = qweight.sum(dim=1, dtype=torch.int32)
    return sums


def check_int8_panels(panels: torch.Tensor, row_sums: torch.Tensor, scale: torch.Tensor, n: int, k: int) -> None:
    """The layout int8_panels.h reads (pack_int8_panels, padded_row_sums, scales padded alike)."""
    shape, padded = int8_panels_shape(n, k), padded_channels(n)
    if panels.dtype != torch.int8 or tuple(panels.shape) != shape or not panels.is_contiguous():
        raise ValueError(f"int8 panels must be contiguous int8 {list(shape)}, got {panels.dtype} {tuple(panels.shape)}")
    for t, dtype, what in ((row_sums, torch.int32, "row sums"), (scale, torch.float32, "scales")):
        if t.dtype != dtype or tuple(t.shape) != (padded,) or not t.is_contiguous():
            raise ValueError(f"int8 {what} must be contiguous {dtype} [{padded}], got {t.dtype} {tuple(t.shape)}")


def int8_panels_gemm(
    x: torch.Tensor, panels: torch.Tensor, row_sums: torch.Tensor, scale: torch.Tensor, n: int,
    rotation_block: int = 0, bias: torch.Tensor | None = None, activation_bits: int = 8,
) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided, columns contiguous) -> [M, n] float32 ~= x' @ (q * scale)^T
    (+ bias) for the int8 weights q [n, K] packed into `panels` (their input-channel pairs obeying
    |q[2j]| + |q[2j+1]| <= 128), each row of x' quantized to activation_bits (8, or 7: ~1.15x faster
    products, twice the rounding error) over its own [min, max], where x' = x, or with rotation_block = b (a
    power of 2 dividing K) every b consecutive columns of x multiplied by the orthonormal b x b Hadamard
    matrix."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1 or x.device.type != "cpu":
        raise ValueError(f"int8_gemm: x must be a float32 CPU matrix with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    num_rows, k = x.shape
    check_int8_panels(panels, row_sums, scale, n, k)
    if rotation_block < 0 or (rotation_block and (rotation_block & (rotation_block - 1) or k % rotation_block)):
        raise ValueError(f"int8_gemm: rotation_block must be 0 or a power of 2 dividing {k}, got {rotation_block}")
    if activation_bits not in ACTIVATION_LEVELS:
        raise ValueError(f"int8_gemm: activation_bits must be 8 or 7, got {activation_bits}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"int8_gemm: bias must be contiguous float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    y = x.new_empty(num_rows, n)
    if num_rows == 0:
        return y
    status = _lib().tm_int8_panels_gemm(
        y.data_ptr(), x.data_ptr(), x.stride(0), rotation_block, panels.data_ptr(), row_sums.data_ptr(),
        scale.data_ptr(), None if bias is None else bias.data_ptr(), num_rows, n, k, ACTIVATION_LEVELS[activation_bits],
        torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"int8_gemm: no memory for {num_rows} x {k} quantized activations")
    return y
