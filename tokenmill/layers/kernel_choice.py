"""Which implementation a layer's small ops use: torch ops, Triton kernels (GPU) or C kernels (CPU)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from tokenmill.kernels.cpu import layer_ops as c_ops

LayerKernel = Literal["torch", "triton", "cpu"]


def layer_kernel_for(backend: Any) -> LayerKernel:
    """Triton kernels beside the triton attention backend; the C kernels beside the torch backend when
    it uses its own C kernels (they were built); torch ops otherwise."""
    if backend.name == "triton":
        return "triton"
    return "cpu" if backend.use_c_kernels else "torch"


def use_c_kernel(*tensors: torch.Tensor | None) -> bool:
    """The C path takes these tensors (None entries are absent operands). Never while torch.compile
    traces: compiled code fuses the torch ops itself and cannot trace a ctypes call."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or c_ops.applies(t) for t in tensors)
