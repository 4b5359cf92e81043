"""W8A8 int8 linear layers for the CPU (`--quantization int8`).

Kernel: kernels/cpu/int8_gemm.c for every row count (decode steps, prefill chunks, the vocabulary
projection): each row quantized per token in one pass, then u8 x s8 -> int32 products against weights
packed in 16-channel panels (kernels/cpu/int8_panels.h), the same tiles inside the C forward
(kernels/cpu/step_forward.c). On the 2-core AVX2 machine they run the SmolLM2 projections at ~1.7x the
float32 panel GEMM and ~1.4x fbgemm's quantized linear with its per-token ops, which this module used
for more than 16 rows before (benchmarks/panel_gemm.py), while torch._int_mm (no VNNI) and torch's packed
weight-only int8/int4 kernels are many times slower than fp32 (benchmarks/README.md).

Exact on every x86 CPU (the pair budget): without VNNI the kernel multiplies with vpmaddubsw, which adds
the products of input channels 2j and 2j+1 into a *saturating* int16. With 8-bit activations
(a in [0, 255]) that pair sum is bounded by 255 * (|q[2j]| + |q[2j+1]|), so weights are quantized
under the budget |q[2j]| + |q[2j+1]| <= 128 (255 * 128 = 32640 <= 32767): no input can saturate.
The per-output-channel scale is max(max pair sum of |w| / 128, max|w| / 127): a row keeps the full
8-bit step where its large weights sit in different pairs, and never gets less than 7 bits.
(The previous scheme cut activations to 7 bits (reduce_range) instead; 8-bit activations with
unbudgeted 8-bit weights saturate: measured 8.7% error on one large row.)

Activations: per-token asymmetric 8 bits, 256 levels over each row's [min, max]. Or 7 bits (128 levels,
`--int8-activation-bits 7`), which lets kernels/cpu/int8_panels.h add two quads' products in int16 before
widening them (exact under the same pair budget: 127 * 256 < 32768): ~1.15x faster products for twice the
activation rounding error. The vocabulary projection keeps 8 bits either way (at decode it is a small
share of the time, and 7 bits there cost the most agreement).

The inputs of qkv_proj, gate_up_proj and down_proj (silu(gate) * up, the most outlier-heavy
activation) are additionally rotated by a block-diagonal 16 x 16 Hadamard matrix H: y = (W H)(H x),
W H folded into the weights once, H x inside the C kernel's quantization pass, which spreads an outlier
channel over 16 channels before quantization.

Measured on SmolLM2-135M, mean KL(fp32 || int8) over the parity texts / held-out texts, and
benchmarks/quant_quality.py (perplexity change, teacher-forced agreement):
  old: 8-bit weights, 7-bit per-token symmetric activations    0.036 / 0.034    +4.0%  91.8%
  7-bit weights ([-64, 64]), 8-bit per-token asymmetric         0.017 / 0.017    +1.1%  95.3%
  pair-budget weights, 8-bit per-token symmetric                0.014 / 0.014    +2.9%  95.5%
  pair-budget weights, 8-bit per-token asymmetric               0.0095 / 0.0092  +0.1%  95.7%
  ... + down_proj Hadamard-16                                  0.0060 / 0.0054  -0.4%  96.9%
  ... + Hadamard-16 on the qkv_proj and gate_up_proj inputs too 0.0042 / 0.0038  +0.4%  98.1%
(the perplexity change of the one fixed text moves by ~0.7 points from run to run; KL does not).
With fbgemm the extra rotations cost one more small GEMM call each, so only down_proj was rotated.
Inside the C kernel's quantization pass (vectorized butterflies) they cost no measurable time (W1
int8: 32.0 s both ways), so all three are rotated (this scheme; with the int8 lm_head, quant_quality
measured teacher-forced 96.1% against 95.1% with down_proj alone). Hadamard blocks of 32 / 64 on
down_proj measured no better than 16. Keeping single projections in fp32 moved KL by at most
~10% either way (the error is spread evenly over the layers), so every projection is quantized.
A per-channel scale search minimizing output error on the calibration activations measured no
better than the plain pair-budget scale (KL 0.0103 vs 0.0095), and GPTQ on the 182-token
calibration text was worse (it overfits).

The vocabulary projection is quantized separately (int8_logits_head, quantize_model_int8's
quantize_lm_head): lm_head itself stays, as it is often the embedding table.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.kernels.cpu.int8_gemm import (
    ACTIVATION_LEVELS,
    int8_gemm_available,
    int8_panels_gemm,
    pack_int8_panels,
    padded_channels,
    padded_row_sums,
)
from tokenmill.quant.projections import float_projections

# Projections whose input is rotated by a block Hadamard matrix at runtime, and the block size.
ROTATED_PROJECTIONS = ("qkv_proj", "gate_up_proj", "down_proj")
ROTATION_BLOCK = 16

# Largest |q[2j]| + |q[2j+1]| of a weight row: 255 * PAIR_BUDGET must fit vpmaddubsw's int16.
PAIR_BUDGET = 128


def int8_supported() -> bool:
    """The int8 layers run on the C kernels (kernels/cpu/int8_gemm.c), built on first use."""
    return int8_gemm_available()


def _require_int8_kernels() -> None:
    if not int8_supported():
        raise ValueError("int8 quantization needs the C kernels (kernels/cpu/int8_gemm.c), which could not be "
                         "built here: is a C compiler installed?")


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


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal, symmetric Sylvester Hadamard matrix [n, n] (n a power of 2): H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of 2, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h / n**0.5


class Int8DynamicLinear(nn.Module):
    """y = x @ W^T + b with pair-budget int8 weights and per-token asymmetric int8 activations.

    rotation_block=b: y = (W H) (H x) with H block-diagonal of b x b Hadamard blocks (H H = I), so
    an outlier input channel is spread over b channels before the activations are quantized."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rotation_block: int | None = None,
                 activation_bits: int = 8) -> None:
        super().__init__()
        if activation_bits not in ACTIVATION_LEVELS:
            raise ValueError(f"int8 activation_bits must be 8 or 7, got {activation_bits}")
        self.activation_bits = activation_bits
        if weight.device.type != "cpu":
            raise ValueError("int8 quantization runs on the CPU; use fp8 on GPUs")
        _require_int8_kernels()
        self.out_features, self.in_features = weight.shape
        self.rotation_block = 0 if rotation_block is None else rotation_block
        weight = weight.detach().float()
        if self.rotation_block:
            if self.in_features % self.rotation_block:
                raise ValueError(f"in_features {self.in_features} is not a multiple of rotation_block "
                                 f"{self.rotation_block}")
            h = hadamard(self.rotation_block)
            weight = (weight.reshape(-1, self.rotation_block) @ h).reshape(weight.shape)  # W H (H symmetric)
        q, scale = quantize_weight_per_channel(weight)
        self.panels = pack_int8_panels(q)
        self.row_sums = padded_row_sums(q)
        self.scale = torch.zeros(padded_channels(self.out_features))
        self.scale[: self.out_features] = scale
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or x2.stride(1) != 1:
            x2 = x2.float().contiguous()
        y = int8_panels_gemm(x2, self.panels, self.row_sums, self.scale, self.out_features, self.rotation_block,
                             self.bias, self.activation_bits)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """q * scale [out_features, in_features], in the rotated basis when rotation_block is set."""
        n, k = self.out_features, self.in_features
        q = self.panels.permute(0, 2, 1, 3).reshape(-1, self.panels.shape[1] * 4)[:n, :k]
        return q.float() * self.scale[:n, None]

    def extra_repr(self) -> str:
        rotation = f", Hadamard block {self.rotation_block}" if self.rotation_block else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 W8A{self.activation_bits}{rotation}")


def quantize_model_int8(
    model: nn.Module, calibration_ids: Sequence[int] | None = None, quantize_lm_head: bool = False,
    activation_bits: int = 8,
) -> int:
    """Replaces the decoder's projection Linears in place; returns how many. With calibration_ids,
    activation outliers are first migrated into the weights (quant/smooth.py). quantize_lm_head: the
    model's compute_logits uses int8_logits_head(lm_head) (counted in the result, 8-bit activations).
    activation_bits: 8, or 7 for the decoder's projections (see the module docstring)."""
    _require_int8_kernels()  # before the calibration pass, which costs a forward
    if calibration_ids:
        from tokenmill.quant.smooth import input_channel_maxima, smooth_model

        smooth_model(model, input_channel_maxima(model, calibration_ids))
    replaced = 0
    for _, slot in float_projections(model):
        child = slot.module
        # A tensor-parallel shard's width may not be a multiple of the block: that one stays unrotated.
        rotate = slot.name in ROTATED_PROJECTIONS and child.weight.shape[1] % ROTATION_BLOCK == 0
        block = ROTATION_BLOCK if rotate else None
        slot.replace(Int8DynamicLinear(child.weight, child.bias, rotation_block=block, activation_bits=activation_bits))
        replaced += 1
    if quantize_lm_head:
        attach_int8_logits_head(model)
        replaced += 1
    return replaced


def attach_int8_logits_head(model: nn.Module) -> None:
    """From now on the model's compute_logits uses int8_logits_head(lm_head); lm_head itself stays."""
    if not hasattr(model, "logits_head"):
        raise ValueError(f"{type(model).__name__} has no logits_head to quantize the lm_head into")
    model.logits_head = int8_logits_head(model.vocab_projection.weight)


def int8_logits_head(lm_head_weight: torch.Tensor) -> Int8DynamicLinear:
    """An int8 vocabulary projection (hidden [T, H] -> logits [T, V]) with a Hadamard-16 rotated input.

    Used by quantize_model_int8(quantize_lm_head=True), the engine's default with int8 (off with
    `--quantize-lm-head false`): batch-1 decode reads the whole vocab matrix every token, 113 MB in
    fp32 for SmolLM2: 9.0 ms at M=1 vs ~1 ms for this (2 threads), ~1.4x faster batch-1 decode.
    Measured on SmolLM2-135M on top of the default int8 body: KL 0.0060 -> 0.0074, perplexity
    +0.1%, teacher-forced agreement 95.9% (vs 96.9%). Unrotated it measured KL 0.0097 / 95.7%, and
    94.3% without the down_proj rotation: keep both rotations if this is used."""
    return Int8DynamicLinear(lm_head_weight, None, rotation_block=ROTATION_BLOCK)
