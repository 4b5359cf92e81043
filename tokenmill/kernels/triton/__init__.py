"""Triton kernels for the GPU path: paged attention, fused rotary + KV write, fused add + RMSNorm, FP8 GEMV.

Every kernel has a torch reference it is tested against (tests/kernels). On a machine without CUDA
the kernels run in Triton's interpreter when TRITON_INTERPRET=1 was set before triton and this
package were first imported (Triton decides per function, when it is defined, and triton.language's
own helpers such as tl.sum are defined at triton's import); that is how the tests run on the CPU.

Interpreter caveats these kernels work around (Triton 3.6 with NumPy >= 2.4):
  * loop bounds that are kernel arguments fail NumPy's int() of a 1-element array: patched below;
  * a tl.dot of bf16/fp16 operands multiplies their raw bits: kernels take DOT_DTYPE, which is
    float32 under the interpreter (compute_dtype below);
  * downcasts to bf16/fp8 truncate instead of rounding, so only float32 outputs are checked tightly
    there; the GPU run of the same tests checks bf16 and fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# Fixed when this package is imported: the kernels below are then defined interpreted or compiled.
INTERPRET: bool = bool(knobs.runtime.interpret)


def _patch_interpreter_index() -> None:
    """Triton's interpreter turns a scalar tensor into a Python int with int(ndarray), which NumPy 2.4
    rejects for 1-element arrays of rank 1; use .item(). Affects only interpreted kernels."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_tokenmill_patched", False):
        return

    def patched(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._tokenmill_patched = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def compute_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand dtype for tl.dot given the activations' dtype: the activations' own on a GPU (tensor
    cores), float32 under the interpreter (see the module docstring)."""
    if INTERPRET:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get exact float32 dots (parity with the reference), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "tokenmill's Triton kernels run on CUDA GPUs; on the CPU only in Triton's interpreter "
            "(set TRITON_INTERPRET=1 before tokenmill.kernels is imported)"
        )


__all__ = ["INTERPRET", "check_device", "compute_dtype", "dot_precision", "tl", "triton"]
