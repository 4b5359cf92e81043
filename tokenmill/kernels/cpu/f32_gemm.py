"""ctypes binding of f32_gemm.c: float32 products against weights packed in 16-channel panels
(f32_panels.h), the packing, and reading rows of the packed weight back (a tied embedding table)."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int

PANEL = 16  # f32_panels.h


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("f32_gemm")
    if lib is None:
        return None
    lib.tm_f32_panels_gemm.argtypes = [_ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.tm_f32_panels_gemm.restype = None
    lib.tm_f32_pack_panels.argtypes = [_ptr, _ptr, _i64, _i64, _int]
    lib.tm_f32_pack_panels.restype = None
    lib.tm_f32_panel_gather.argtypes = [_ptr, _ptr, _ptr, _i64, _i64]
    lib.tm_f32_panel_gather.restype = None
    return lib


def f32_panels_available() -> bool:
    return _lib() is not None


def panels_shape(n: int, k: int) -> tuple[int, int, int]:
    return ((n + PANEL - 1) // PANEL, k, PANEL)


def check_panels(panels: torch.Tensor, n: int, k: int) -> None:
    shape = panels_shape(n, k)
    if panels.dtype != torch.float32 or tuple(panels.shape) != shape or not panels.is_contiguous() \
            or panels.device.type != "cpu":
        raise ValueError(f"float32 panels must be a contiguous float32 CPU tensor {list(shape)}, got "
                         f"{panels.dtype} {tuple(panels.shape)} on {panels.device}")


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [n, k] float32 -> panels [ceil(n / 16), k, 16]: channel 16 p + j at [p, :, j], zero past n."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"pack_panels: weight must be a float32 CPU matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)} on {weight.device}")
    weight = weight.contiguous()
    n, k = weight.shape
    panels = torch.empty(panels_shape(n, k), dtype=torch.float32)
    _lib().tm_f32_pack_panels(panels.data_ptr(), weight.data_ptr(), n, k, torch.get_num_threads())
    return panels


def panels_linear(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 (rows may be strided, columns contiguous) -> x W^T (+ bias) [M, n] for the weight
    W [n, K] packed into `panels`. Each output sums over K in order (f32_panels.h), so a row's result does
    not depend on the other rows."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1 or x.device.type != "cpu":
        raise ValueError(f"panels_linear: x must be a float32 CPU matrix with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()} on {x.device}")
    num_rows, k = x.shape
    check_panels(panels, n, k)
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"panels_linear: bias must be contiguous float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    y = x.new_empty(num_rows, n)
    if num_rows:
        _lib().tm_f32_panels_gemm(y.data_ptr(), x.data_ptr(), x.stride(0), panels.data_ptr(),
                                  None if bias is None else bias.data_ptr(), num_rows, n, k, torch.get_num_threads())
    return y


def weight_rows_from_panels(panels: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Rows `ids` (any shape, values in [0, n)) of the weight packed into `panels` -> [*ids.shape, K]."""
    k = panels.shape[1]
    check_panels(panels, n, k)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
        raise ValueError(f"weight_rows_from_panels: ids must be in [0, {n}), got values in [{int(flat.min())}, {int(flat.max())}]")
    out = torch.empty(flat.numel(), k, dtype=torch.float32)
    _lib().tm_f32_panel_gather(out.data_ptr(), panels.data_ptr(), flat.data_ptr(), flat.numel(), k)
    return out.reshape(*ids.shape, k)
