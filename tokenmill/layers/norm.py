from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.cpu import layer_ops as c_ops
from tokenmill.layers.kernel_choice import LayerKernel, use_c_kernel


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF Llama does), cast back to the input dtype before the weight.

    forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual): the residual
    add of the previous sublayer fused into this norm. kernel "triton" (the GPU path) and "cpu" (C,
    float32 CPU tensors) do that in one call and update `residual` in place; "torch" allocates the sum.
    """

    def __init__(self, hidden_size: int, eps: float, kernel: LayerKernel = "torch") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.kernel = kernel

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernel == "triton":
            from tokenmill.kernels.triton.rmsnorm import rms_norm

            out = rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if self.kernel == "cpu" and use_c_kernel(x, residual, self.weight):
            out = c_ops.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
