"""W8A8 int8 linear layers for the CPU (`--quantization int8`).

Kernel: fbgemm's `quantized::linear_dynamic` computes the input's range, quantizes it to uint8, runs
the u8 x s8 -> int32 GEMM and dequantizes the output in one op, so no separate quantization pass eats
the gain at small M. On a 2-core AVX2 CPU it runs the SmolLM2 projections faster than fp32, while
torch._int_mm (no VNNI) and torch's packed weight-only int8/int4 kernels are many times slower than
fp32 (benchmarks/README.md has the measured table).

Exact on every x86 CPU (the pair budget): without VNNI fbgemm multiplies with vpmaddubsw, which adds
the products of input channels 2j and 2j+1 into a *saturating* int16. With 8-bit activations
(a in [0, 255]) that pair sum is bounded by 255 * (|q[2j]| + |q[2j+1]|), so weights are quantized
under the budget |q[2j]| + |q[2j+1]| <= 128 (255 * 128 = 32640 <= 32767): no input can saturate.
The per-output-channel scale is max(max pair sum of |w| / 128, max|w| / 127): a row keeps the full
8-bit step where its large weights sit in different pairs, and never gets less than 7 bits.
(Before, activations were cut to 7 bits (reduce_range) instead; 8-bit activations with unbudgeted
8-bit weights saturate: measured 8.7% error on one large row.)

Activations: per-token asymmetric 8 bits. Each row is mapped affinely onto [-1, 1]
(x' = (x - mid) / half) so fbgemm's per-tensor range becomes per token and every token uses all
256 levels, then y = half * (W x') + mid * (W 1). A single row needs no mapping: fbgemm's range is
then that row's own (widened to include 0).

Measured on SmolLM2-135M (benchmarks/quant_quality.py, mean KL(fp32 || int8) over the parity texts):
8-bit weights / 7-bit per-token symmetric activations (the old scheme) 0.035; 7-bit weights
([-64, 64]) / 8-bit symmetric 0.021, asymmetric 0.017; pair-budget weights / 8-bit asymmetric
0.0095. Keeping single projections in fp32 moved KL by at most ~10% either way (the error is spread
evenly over the layers), so every projection is quantized.

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

# Largest |q[2j]| + |q[2j+1]| of a weight row: 255 * PAIR_BUDGET must fit vpmaddubsw's int16.
PAIR_BUDGET = 128


def int8_supported() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N, ceil(K / 2), 2]: the input-channel pairs vpmaddubsw adds (odd K: zero-padded)."""
    if x.shape[1] % 2:
        x = torch.nn.functional.pad(x, (0, 1))
    return x.reshape(x.shape[0], -1, 2)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scale [N]) with W ~= q * scale[:, None] and every
    pair |q[n, 2j]| + |q[n, 2j + 1]| <= PAIR_BUDGET."""
    w = weight.detach().float()
    pair_max = _pairs(w.abs()).sum(dim=2).amax(dim=1)
    scale = torch.maximum(pair_max / PAIR_BUDGET, w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127)
    # |w[2j]| + |w[2j+1]| <= 128 * scale, so rounding can only overshoot by 1 (float error or two
    # halves rounded up): take that unit from the larger magnitude of the pair.
    mag = _pairs(q.abs())
    over = (mag.sum(dim=2) - PAIR_BUDGET).clamp_(min=0)
    larger = (mag[..., 1] > mag[..., 0]).long()
    mag.scatter_add_(2, larger.unsqueeze(2), -over.unsqueeze(2))
    q = mag.reshape(w.shape[0], -1)[:, : w.shape[1]] * torch.sign(q)
    return q.to(torch.int8), scale


class Int8DynamicLinear(nn.Module):
    """y = x @ W^T + b with pair-budget int8 weights and per-token asymmetric int8 activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError("int8 quantization runs on the CPU; use fp8 on GPUs")
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        q, scale = quantize_weight_per_channel(weight)
        with warnings.catch_warnings():  # quantized tensors are the packing API fbgemm takes
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(scale.shape[0], dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        # W 1 of the quantized weight, [1, N]: restores the per-row shift `mid` exactly.
        self._row_sums = (q.float() * scale[:, None]).sum(dim=1).unsqueeze(0)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if x2.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, False)
        else:
            y = self._per_token(x2)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _per_token(self, x2: torch.Tensor) -> torch.Tensor:
        # W x = half * W ((x - mid) / half) + mid * W 1: each row spans exactly [-1, 1], so the
        # per-tensor range fbgemm picks is every row's own range and no token coarsens another.
        lo, hi = torch.aminmax(x2, dim=1, keepdim=True)
        mid = (hi + lo).mul_(0.5)
        half = (hi - lo).mul_(0.5).clamp_min_(1e-12)
        y = torch.ops.quantized.linear_dynamic((x2 - mid).div_(half), self._packed, False)
        return y.mul_(half).addmm_(mid, self._row_sums)

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
