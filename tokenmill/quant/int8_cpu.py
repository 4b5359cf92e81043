"""W8A8 int8 linear layers for the CPU (`--quantization int8`).

Weights: symmetric int8 with one scale per output channel, prepacked once for fbgemm.
Activations: quantized dynamically inside the GEMM call (fbgemm's `quantized::linear_dynamic`
computes the input's range, quantizes it to uint8, runs the int8 x int8 -> int32 GEMM and
dequantizes the output in one op), so no separate quantization pass eats the gain at small M.
Activations are quantized to 7 bits (reduce_range=True): on AVX2 CPUs without VNNI fbgemm's
u8 x s8 multiply-add (vpmaddubsw) saturates int16 with full 8-bit activations (measured: a single
large row then came out 8.7% off instead of ~2%), so 8 bits would be silently wrong there.

Why this kernel: on a 2-core AVX2 CPU it runs the SmolLM2 projections ~2x faster than fp32 from
M=1 up, while torch._int_mm (no VNNI) and torch's packed weight-only int8/int4 kernels are many
times slower than fp32 (see benchmarks/README.md for the measured table).

The vocabulary projection (lm_head) stays fp32: it is the layer where quantization error moves
greedy picks most, it only runs for sampling rows, and it is often tied to the embedding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.layers.linear import Linear

QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def int8_supported() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scale [N]) with W ~= W_int8 * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8DynamicLinear(nn.Module):
    """y = x @ W^T + b with int8 weights (per channel) and dynamically quantized activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce_range: bool = True) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError("int8 quantization runs on the CPU; use fp8 on GPUs")
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.reduce_range = reduce_range
        q, scale = quantize_weight_per_channel(weight)
        with warnings.catch_warnings():  # quantized tensors are the packing API fbgemm takes
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(scale.shape[0], dtype=torch.long), 0)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        # Rows scaled to max |x| = 1 make fbgemm's per-tensor activation range a per-token one:
        # W (x / r) * r == W x, and one large-norm token no longer coarsens every other row.
        row_max = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)
        y = torch.ops.quantized.linear_dynamic(x2 / row_max, self._packed, self.reduce_range).mul_(row_max)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8 (fbgemm)"


def quantize_model_int8(model: nn.Module, calibration_ids: Sequence[int] | None = None) -> int:
    """Replaces the decoder's projection Linears in place; returns how many. With calibration_ids,
    activation outliers are first migrated into the weights (quant/smooth.py)."""
    if not int8_supported():
        raise ValueError("int8 quantization needs torch's fbgemm/x86 quantized engine, which this torch lacks")
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    if calibration_ids:
        from tokenmill.quant.smooth import input_channel_maxima, smooth_model

        smooth_model(model, input_channel_maxima(model, calibration_ids))
    names = set(QUANTIZED_PROJECTIONS)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, Linear):
                setattr(parent, name, Int8DynamicLinear(child.weight, child.bias))
                replaced += 1
    return replaced
