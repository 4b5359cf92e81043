"""ctypes binding of int8_screen.c: the int8 screen of a greedy vocabulary projection, and its weight packing."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int

PANEL = 16  # channels per panel (int8_screen.c)


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("int8_screen")
    if lib is None:
        return None
    lib.tm_int8_screen.argtypes = [_ptr, _ptr, _ptr, _i64, _int, _ptr, _ptr, _ptr, _i64, _i64, _int]
    lib.tm_int8_screen.restype = _i64
    return lib


def int8_screen_available() -> bool:
    return _lib() is not None


def pack_screen_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [n, k] -> (int8 panels [ceil(n / 16), k, 16], float32 scales [ceil(n / 16) * 16]): channel n's
    q_n = round(w_n / s_n) with s_n = max |w_n| / 127 (so |w_n - s_n q_n| <= s_n / 2), zero past n."""
    w = weight.detach().float()
    n, k = w.shape
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    num_panels = -(-n // PANEL)
    padded = torch.zeros(num_panels * PANEL, k, dtype=torch.int8)
    padded[:n] = q
    scales = torch.zeros(num_panels * PANEL, dtype=torch.float32)
    scales[:n] = scale
    return padded.view(num_panels, PANEL, k).transpose(1, 2).contiguous(), scales


def int8_screen(x: torch.Tensor, panels: torch.Tensor, scales: torch.Tensor, bounds: torch.Tensor, n: int,
                round_bf16: bool) -> torch.Tensor:
    """The panels (int64 indices, ascending) that can hold some row's largest logit of x [m, k] W^T, screened through
    pack_screen_weight's (panels, scales), each channel's score within bounds[n] * |x|_1 of its logit (int8_screen.c);
    x is rounded to bf16 first where the exact projection multiplies bf16 (round_bf16)."""
    x = x.float().contiguous()
    m, k = x.shape
    num_panels = -(-n // PANEL)
    if panels.dtype != torch.int8 or tuple(panels.shape) != (num_panels, k, PANEL) or not panels.is_contiguous():
        raise ValueError(f"int8_screen: panels must be int8 [{num_panels}, {k}, {PANEL}], got {panels.dtype} "
                         f"{tuple(panels.shape)}")
    passed = torch.empty(num_panels, dtype=torch.int64)
    scratch = torch.empty(m * (num_panels * PANEL + k), dtype=torch.float32)
    if bounds.dtype != torch.float32 or bounds.shape != scales.shape or not bounds.is_contiguous():
        raise ValueError(f"int8_screen: bounds must be float32 like the scales {tuple(scales.shape)}")
    count = _lib().tm_int8_screen(passed.data_ptr(), scratch.data_ptr(), x.data_ptr(), m, int(round_bf16),
                                  panels.data_ptr(), scales.data_ptr(), bounds.data_ptr(), n, k,
                                  torch.get_num_threads())
    if count < 0:
        raise ValueError(f"int8_screen: {m} rows or {torch.get_num_threads()} threads out of range")
    return passed[:count]
