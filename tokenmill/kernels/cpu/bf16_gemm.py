"""ctypes binding of bf16_gemm.c: bfloat16 products against weights packed in 16-channel panels of input pairs
(bf16_panels.h; AMX tiles or AVX512-BF16 where the CPU has them, portable float32 loops elsewhere)."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int

PANEL, K_BLOCK = 16, 32  # bf16_panels.h


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("bf16_gemm")
    if lib is None:
        return None
    lib.tm_bf16_panels_gemm.argtypes = [_ptr, _int, _ptr, _i64, _int, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.tm_bf16_panels_gemm.restype = None
    lib.tm_bf16_panels_argmax.argtypes = [_ptr, _ptr, _ptr, _i64, _int, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.tm_bf16_panels_argmax.restype = _int
    lib.tm_bf16_pack_panels.argtypes = [_ptr, _ptr, _i64, _i64, _int]
    lib.tm_bf16_pack_panels.restype = None
    lib.tm_bf16_amx_ready.argtypes = []
    lib.tm_bf16_amx_ready.restype = _int
    return lib


def bf16_panels_available() -> bool:
    return _lib() is not None


def bf16_amx_ready() -> bool:
    """Products of 16 or more rows run on AMX tiles in this process."""
    return bool(_lib() is not None and _lib().tm_bf16_amx_ready())


def k_pad(k: int) -> int:
    return (k + K_BLOCK - 1) // K_BLOCK * K_BLOCK


def bf16_panels_shape(n: int, k: int) -> tuple[int, int, int, int]:
    return ((n + PANEL - 1) // PANEL, k_pad(k) // 2, PANEL, 2)


def pack_bf16_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [n, k] (rounded to bf16) -> panels [ceil(n / 16), k_pad / 2, 16, 2] bf16, zero past n and k."""
    if weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"pack_bf16_panels: weight must be a CPU matrix, got {tuple(weight.shape)} on {weight.device}")
    w = weight.detach().to(torch.bfloat16).contiguous()
    n, k = w.shape
    panels = torch.empty(bf16_panels_shape(n, k), dtype=torch.bfloat16)
    _lib().tm_bf16_pack_panels(panels.data_ptr(), w.data_ptr(), n, k, torch.get_num_threads())
    return panels


def _checked_operands(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None, what: str
                      ) -> torch.Tensor:
    """x as the kernels read it: bf16 rows of k_pad columns (zero past k), padded to whole 16-row blocks from 16
    rows on (the AMX path runs the last num_rows % 16 rows as one more block; the padding is never read back)."""
    if x.dim() != 2 or x.device.type != "cpu":
        raise ValueError(f"{what}: x must be a CPU matrix, got {tuple(x.shape)} on {x.device}")
    num_rows, k = x.shape
    if tuple(panels.shape) != bf16_panels_shape(n, k) or panels.dtype != torch.bfloat16 or not panels.is_contiguous():
        raise ValueError(f"{what}: panels must be contiguous bf16 {list(bf16_panels_shape(n, k))}, got "
                         f"{panels.dtype} {tuple(panels.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"{what}: bias must be contiguous float32 [{n}]")
    kp = k_pad(k)
    rows = -(-num_rows // 16) * 16 if num_rows >= 16 else num_rows
    if x.dtype != torch.bfloat16 or x.stride(1) != 1 or kp != k or rows != num_rows:
        padded = x.new_zeros(rows, kp, dtype=torch.bfloat16)
        padded[:num_rows, :k] = x
        x = padded
    return x


def bf16_panels_linear(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] (bf16, or float32 rounded to bf16) -> x W^T (+ bias) [M, n] in out_dtype (bfloat16 or float32),
    accumulated in float32, for the weight W [n, K] packed into `panels`."""
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"bf16_panels_linear: out_dtype must be bfloat16 or float32, got {out_dtype}")
    num_rows, k = x.shape if x.dim() == 2 else (0, 0)
    x = _checked_operands(x, panels, n, bias, "bf16_panels_linear")
    y = torch.empty(num_rows, n, dtype=out_dtype)
    if num_rows:
        _lib().tm_bf16_panels_gemm(y.data_ptr(), int(out_dtype == torch.bfloat16), x.data_ptr(), x.stride(0), 1,
                                   panels.data_ptr(), None if bias is None else bias.data_ptr(), num_rows, n, k,
                                   torch.get_num_threads())
    return y


def bf16_panels_argmax(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None,
                       values: torch.Tensor | None = None) -> torch.Tensor:
    """The index of each row's largest value of x W^T (+ bias) [M] (int64; the lowest among equal values), the
    same as argmax over bf16_panels_linear's float32 output (the same sums), without writing the [M, n] products:
    greedy decoding's vocabulary projection. values: None, or a float32 [M] tensor that gets those largest values."""
    num_rows, k = x.shape if x.dim() == 2 else (0, 0)
    x = _checked_operands(x, panels, n, bias, "bf16_panels_argmax")
    ids = torch.empty(num_rows, dtype=torch.int64)
    if values is not None and (values.dtype != torch.float32 or values.shape != (num_rows,)
                               or not values.is_contiguous()):
        raise ValueError(f"bf16_panels_argmax: values must be float32 [{num_rows}], got {values.dtype} "
                         f"{tuple(values.shape)}")
    if num_rows and _lib().tm_bf16_panels_argmax(ids.data_ptr(), None if values is None else values.data_ptr(),
                                                 x.data_ptr(), x.stride(0), 1, panels.data_ptr(),
                                                 None if bias is None else bias.data_ptr(), num_rows, n, k,
                                                 torch.get_num_threads()) != 0:
        raise MemoryError("bf16_panels_argmax: scratch allocation failed")
    return ids
