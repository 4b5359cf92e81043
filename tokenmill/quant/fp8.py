"""FP8 (e4m3) weight quantization for Hopper GPUs.

Weights: one float32 scale per output channel (per-channel) or one per tensor, chosen so the
channel's (tensor's) largest magnitude maps to the format's largest finite value, 448:
W ~= W_fp8 * scale. Forward, by batch size:
  * up to MAX_M rows (decode): a Triton kernel that widens the FP8 weights in registers (weight
    bytes halved, activations untouched);
  * more rows (prefill, large decode batches): activations quantized per token (row, one Triton
    kernel) and torch._scaled_mm on the FP8 tensor cores, out = (x_fp8 @ W_fp8^T) * x_scale * w_scale.
lm_head stays in the model dtype (the vocab projection is the most sensitive layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from tokenmill.models.interface import CausalLM

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
_MIN_SCALE = 1e-12


def quantize_weight(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (FP8 [N, K], float32 scale [N]); a per-tensor scale is repeated over N."""
    w = weight.float()
    if per_channel:
        amax = w.abs().amax(dim=1)
    else:
        amax = w.abs().amax().expand(w.shape[0])
    scale = (amax / FP8_MAX).clamp_min(_MIN_SCALE)
    q = (w / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(1)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (FP8 [M, K], float32 scale [M, 1]) with each row's largest magnitude at 448."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) @ dequant(weight [N, K], scale [N])^T through torch._scaled_mm with
    row-wise scales (per-token activations, per-channel weights)."""
    if x.is_cuda:
        from tokenmill.kernels.triton.fp8_gemm import quantize_rows_fp8

        xq, x_scale = quantize_rows_fp8(x)  # one kernel instead of five
    else:
        xq, x_scale = quantize_per_token(x)
    # weight.t() is column-major [K, N], the layout _scaled_mm wants for its second operand.
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), bias=bias,
                            out_dtype=x.dtype)


class Fp8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, per_channel: bool = True) -> Fp8Linear:
        q, scale = quantize_weight(linear.weight.data, per_channel)
        bias = None if linear.bias is None else linear.bias.data
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tokenmill.kernels.triton.fp8_gemm import MAX_M, w8a16_gemm

        x2 = x.reshape(-1, self.in_features)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        if x2.shape[0] <= MAX_M:
            out = w8a16_gemm(x2, self.weight, self.weight_scale, self.bias)
        else:
            out = scaled_mm(x2, self.weight, self.weight_scale, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def quantize_model_fp8(model: CausalLM, per_channel: bool = True) -> int:
    """Replaces every decoder projection (models/interface.py) that is a tokenmill Linear by an Fp8Linear, in place,
    freeing the original weights; the vocabulary projection stays. Returns the number of layers replaced."""
    from tokenmill.quant.projections import float_projections

    slots = [slot for _, slot in float_projections(model)]
    for slot in slots:  # each weight is freed as soon as its replacement exists (peak: one layer extra)
        slot.replace(Fp8Linear.from_linear(slot.module, per_channel))
    return len(slots)
