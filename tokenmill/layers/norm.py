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
    A bfloat16 model on the "cpu" kernel keeps its residual stream in float32 (models/llama.py): the C
    kernel takes bf16 or float32 x and a float32 residual and returns bf16 (the weight's dtype).
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
        if self.kernel == "cpu" and self._takes_bf16(x, residual):
            out = c_ops.rms_norm_bf16(x, self.float32_weight(), self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _takes_bf16(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        return (self.weight.dtype == torch.bfloat16 and c_ops.layer_ops_available()
                and not torch.compiler.is_compiling()
                and (c_ops.applies_bf16(x) or c_ops.applies(x)) and (residual is None or c_ops.applies(residual)))

    def float32_weight(self) -> torch.Tensor:
        """The weight's exact values in float32, made once (after the checkpoint is loaded)."""
        cached = getattr(self, "_weight32", None)
        if cached is None:
            cached = self._weight32 = self.weight.detach().float().contiguous()
        return cached

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # A float32 residual stream under a 16-bit weight (models/llama.py): the output takes the weight's dtype.
        return (self.weight * x32.to(dtype)).to(self.weight.dtype)
