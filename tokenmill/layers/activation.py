from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels.cpu import layer_ops as c_ops
from tokenmill.layers.kernel_choice import LayerKernel, use_c_kernel


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for the merged gate/up projection (one kernel call with kernel
    "triton" or "cpu")."""

    def __init__(self, kernel: LayerKernel = "torch") -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton":
            from tokenmill.kernels.triton.activation import silu_and_mul

            return silu_and_mul(x)
        if self.kernel == "cpu" and use_c_kernel(x):
            return c_ops.silu_and_mul(x)
        if self.kernel == "cpu" and c_ops.applies_bf16(x) and c_ops.layer_ops_available() \
                and not torch.compiler.is_compiling():
            return c_ops.silu_and_mul_bf16(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
