"""ctypes binding of bf16_prompt_attention.c: causal attention of whole-context prompts in bf16 (AMX tiles, else
AVX512-BF16's vdpbf16ps) over the step's own rotated bf16 q/k/v rows (a bf16 model's candidate beside torch's fused
attention)."""

from __future__ import annotations

import ctypes
import functools

import torch

from tokenmill.kernels.cpu.build import load_kernel_library

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p

AMX_ATTENTION_MAX_KEYS = 8192  # bf16_attention_amx.h: the longest prompt it takes


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_kernel_library("bf16_prompt_attention")
    if lib is None:
        return None
    lib.tm_bf16_prompt_attention.argtypes = [_ptr, _i64, ctypes.c_int, _ptr, _i64, _ptr, _i64, _ptr, _i64, ctypes.c_int,
                                             _ptr, _ptr] + [_i64] * 4 + [ctypes.c_float, ctypes.c_int]
    lib.tm_bf16_prompt_attention.restype = ctypes.c_int
    lib.tm_bf16_prompt_attention_ready.argtypes = [_i64]
    lib.tm_bf16_prompt_attention_ready.restype = ctypes.c_int
    return lib


def bf16_prompt_attention_available(head_dim: int) -> bool:
    """The kernel runs here: built, the CPU has AMX-BF16 granted to this process or AVX512-BF16, head_dim a multiple
    of 32."""
    lib = _lib()
    return lib is not None and bool(lib.tm_bf16_prompt_attention_ready(head_dim))


def _row_stride(t: torch.Tensor, name: str, dtype: torch.dtype) -> int:
    """Row stride (elements) of a [T, heads, D] view of `dtype` with contiguous heads."""
    if t.dtype != dtype or t.dim() != 3 or t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise ValueError(f"bf16_prompt_attention: {name} must be {dtype} [T, heads, D] with contiguous heads, got "
                         f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    return t.stride(0) if t.shape[0] > 1 else t.shape[1] * t.shape[2]


def bf16_prompt_attention(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          starts: list[int], lens: list[int], scale: float) -> None:
    """Causal attention of prompts whose whole context is in the step, in bf16 (AMX tiles or vdpbf16ps): prompt i
    owns rows starts[i] .. + lens[i] - 1 of query [T, H, D] and key/value [T, Hkv, D] (rotated; bf16, or float32
    rounded to bf16 as read) and gets them in out [T, H, D] (bf16 or float32; other rows untouched)."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the bf16 prompt attention kernel is not available (no C compiler?)")
    if len(starts) != len(lens):
        raise ValueError("bf16_prompt_attention: starts and lens differ in length")
    if query.dtype not in (torch.bfloat16, torch.float32) or out.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"bf16_prompt_attention: bf16 or float32 tensors, got {query.dtype} -> {out.dtype}")
    total, heads, dim = query.shape
    kv_heads = key.shape[1]
    if (key.shape != value.shape or key.shape[0] != total or key.shape[2] != dim or heads % kv_heads
            or out.shape != query.shape):
        raise ValueError(f"bf16_prompt_attention: key/value {tuple(key.shape)}/{tuple(value.shape)} and out "
                         f"{tuple(out.shape)} do not match query {tuple(query.shape)}")
    if any(s < 0 or n < 1 or s + n > total for s, n in zip(starts, lens, strict=True)):
        raise ValueError("bf16_prompt_attention: a prompt's rows fall outside the step")
    strides = [_row_stride(t, name, query.dtype) for t, name in ((query, "query"), (key, "key"), (value, "value"))]
    out_stride = _row_stride(out, "out", out.dtype)
    if not starts:
        return
    starts_t = torch.tensor(starts, dtype=torch.int64)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    status = lib.tm_bf16_prompt_attention(
        out.data_ptr(), out_stride, int(out.dtype == torch.bfloat16), query.data_ptr(), strides[0], key.data_ptr(),
        strides[1], value.data_ptr(), strides[2], int(query.dtype == torch.bfloat16), starts_t.data_ptr(),
        lens_t.data_ptr(), len(starts), heads, kv_heads, dim, scale, torch.get_num_threads())
    if status == 1:
        raise MemoryError("bf16_prompt_attention: could not allocate scratch memory")
    if status == 2:
        raise ValueError(f"bf16_prompt_attention: not supported here (AMX-BF16 or AVX512-BF16, head_dim {dim} a "
                         "multiple of 32 up to 256, prompts of up to 8192 tokens)")
