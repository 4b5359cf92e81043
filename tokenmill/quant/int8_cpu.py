"""W8A8 int8 linear layers for the CPU (`--quantization int8`).

Kernels: up to FUSED_MAX_ROWS rows (decode batches), kernels/cpu/int8_gemm.c quantizes each row and
runs the u8 x s8 -> int32 product in one call. More rows go to fbgemm's `quantized::linear_dynamic`
(range, uint8 quantization, GEMM and dequantization in one op), whose per-call work costs more than the
product at a few rows. On a 2-core AVX2 CPU both run the SmolLM2 projections faster than fp32, while
torch._int_mm (no VNNI) and torch's packed weight-only int8/int4 kernels are many times slower than
fp32 (benchmarks/README.md has the measured table).

Exact on every x86 CPU (the pair budget): without VNNI fbgemm multiplies with vpmaddubsw, which adds
the products of input channels 2j and 2j+1 into a *saturating* int16. With 8-bit activations
(a in [0, 255]) that pair sum is bounded by 255 * (|q[2j]| + |q[2j+1]|), so weights are quantized
under the budget |q[2j]| + |q[2j+1]| <= 128 (255 * 128 = 32640 <= 32767): no input can saturate.
The per-output-channel scale is max(max pair sum of |w| / 128, max|w| / 127): a row keeps the full
8-bit step where its large weights sit in different pairs, and never gets less than 7 bits.
(The previous scheme cut activations to 7 bits (reduce_range) instead; 8-bit activations with
unbudgeted 8-bit weights saturate: measured 8.7% error on one large row.)

Activations: per-token asymmetric 8 bits. The C kernel puts 256 levels over each row's [min, max].
For fbgemm each row is mapped affinely onto [-1, 1]
(x' = (x - mid) / half) so fbgemm's per-tensor range becomes per token and every token uses all
256 levels, then y = half * (W x') + mid * (W 1). A single row needs no mapping: fbgemm's range is
then that row's own (widened to include 0).

down_proj's input (silu(gate) * up, the most outlier-heavy activation) is additionally rotated by a
block-diagonal 16 x 16 Hadamard matrix H: y = (W H)(H x), W H folded into the weights once, H x inside
the C kernel's quantization pass (or one small GEMM before fbgemm), which spreads an outlier channel
over 16 channels before quantization.

Measured on SmolLM2-135M, mean KL(fp32 || int8) over the parity texts / held-out texts, and
benchmarks/quant_quality.py (perplexity change, teacher-forced agreement):
  old: 8-bit weights, 7-bit per-token symmetric activations    0.036 / 0.034    +4.0%  91.8%
  7-bit weights ([-64, 64]), 8-bit per-token asymmetric         0.017 / 0.017    +1.1%  95.3%
  pair-budget weights, 8-bit per-token symmetric                0.014 / 0.014    +2.9%  95.5%
  pair-budget weights, 8-bit per-token asymmetric               0.0095 / 0.0092  +0.1%  95.7%
  ... + down_proj Hadamard-16 (this scheme)                     0.0060 / 0.0054  -0.4%  96.9%
  ... + Hadamard-16 on the qkv_proj and gate_up_proj inputs too 0.0042 / 0.0038  +0.4%  98.1%
(the perplexity change of the one fixed text moves by ~0.7 points from run to run; KL does not).
Rotating qkv_proj and gate_up_proj too costs one more small GEMM call each: per-layer linear time
at one token 434 -> 516 us (fp32: 575 us), so only down_proj is rotated; Hadamard blocks of 32 / 64
on down_proj measured no better than 16. Keeping single projections in fp32 moved KL by at most
~10% either way (the error is spread evenly over the layers), so every projection is quantized.
A per-channel scale search minimizing output error on the calibration activations measured no
better than the plain pair-budget scale (KL 0.0103 vs 0.0095), and GPTQ on the 182-token
calibration text was worse (it overfits).

The vocabulary projection is quantized separately (int8_logits_head, quantize_model_int8's
quantize_lm_head): lm_head itself stays, as it is often the embedding table.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.kernels.cpu.int8_gemm import int8_gemm, int8_gemm_available, int8_row_sums
from tokenmill.quant.projections import projection_linears

# Projections whose input is rotated by a block Hadamard matrix at runtime, and the block size.
ROTATED_PROJECTIONS = ("down_proj",)
ROTATION_BLOCK = 16

# Up to this many rows the product runs in kernels/cpu/int8_gemm.c (same arithmetic, per-token
# quantization fused in); more rows go to fbgemm's GEMM. Measured on the 2-core AVX2 machine: the
# kernel is ~2x faster than fbgemm + the per-token ops at 4 rows and even at 16-32 on the decoder's
# projections, but fbgemm's blocking wins from 8 rows on the 49152-wide vocabulary projection.
FUSED_MAX_ROWS = 16
LOGITS_FUSED_MAX_ROWS = 4

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

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rotation_block: int | None = None,
        fused_max_rows: int | None = None,
    ) -> None:
        super().__init__()
        # None: FUSED_MAX_ROWS, read at call time.
        self.fused_max_rows = fused_max_rows
        if weight.device.type != "cpu":
            raise ValueError("int8 quantization runs on the CPU; use fp8 on GPUs")
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self._rotation: torch.Tensor | None = None
        if rotation_block is not None:
            if self.in_features % rotation_block:
                raise ValueError(f"in_features {self.in_features} is not a multiple of rotation_block {rotation_block}")
            self._rotation = hadamard(rotation_block)
            weight = self._rotate(weight.detach().float())
        q, scale = quantize_weight_per_channel(weight)
        with warnings.catch_warnings():  # quantized tensors are the packing API fbgemm takes
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(scale.shape[0], dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        # The same weights unpacked, for the fused kernel of decode-sized row counts.
        self._qweight, self._scale = q.contiguous(), scale.contiguous()
        self._qweight_row_sums = int8_row_sums(self._qweight)
        # W 1 of the quantized weight, [1, N]: restores the per-row shift `mid` exactly.
        self._row_sums = (q.float() * scale[:, None]).sum(dim=1).unsqueeze(0)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        fused_max_rows = FUSED_MAX_ROWS if self.fused_max_rows is None else self.fused_max_rows
        if x2.shape[0] <= fused_max_rows and int8_gemm_available():
            rotation_block = 0 if self._rotation is None else self._rotation.shape[0]
            y = int8_gemm(x2.contiguous(), self._qweight, self._qweight_row_sums, self._scale, rotation_block)
        else:
            if self._rotation is not None:
                x2 = self._rotate(x2)
            if x2.shape[0] == 1:
                y = torch.ops.quantized.linear_dynamic(x2, self._packed, False)
            else:
                y = self._per_token(x2)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        """[R, K] -> [R, K] with every block of b consecutive columns multiplied by H (symmetric)."""
        assert self._rotation is not None
        b = self._rotation.shape[0]
        return torch.nn.functional.linear(t.reshape(-1, b), self._rotation).reshape(t.shape)

    def _per_token(self, x2: torch.Tensor) -> torch.Tensor:
        # W x = half * W ((x - mid) / half) + mid * W 1: each row spans exactly [-1, 1], so the
        # per-tensor range fbgemm picks is every row's own range and no token coarsens another.
        # amin + amax, not aminmax: torch's CPU aminmax over rows measured ~10x slower (441 vs 47 us, 512 x 576).
        lo, hi = x2.amin(dim=1, keepdim=True), x2.amax(dim=1, keepdim=True)
        mid = (hi + lo).mul_(0.5)
        half = (hi - lo).mul_(0.5).clamp_min_(1e-12)
        y = torch.ops.quantized.linear_dynamic((x2 - mid).div_(half), self._packed, False)
        return y.mul_(half).addmm_(mid, self._row_sums)

    def extra_repr(self) -> str:
        rotation = "" if self._rotation is None else f", Hadamard block {self._rotation.shape[0]}"
        fused = FUSED_MAX_ROWS if self.fused_max_rows is None else self.fused_max_rows
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8 (C kernel up to "
                f"{fused} rows, fbgemm beyond){rotation}")


def quantize_model_int8(
    model: nn.Module, calibration_ids: Sequence[int] | None = None, quantize_lm_head: bool = False
) -> int:
    """Replaces the decoder's projection Linears in place; returns how many. With calibration_ids,
    activation outliers are first migrated into the weights (quant/smooth.py). quantize_lm_head: the
    model's compute_logits uses int8_logits_head(lm_head) (counted in the result)."""
    use_fbgemm_engine()
    if calibration_ids:
        from tokenmill.quant.smooth import input_channel_maxima, smooth_model

        smooth_model(model, input_channel_maxima(model, calibration_ids))
    replaced = 0
    for _, parent, name, child in projection_linears(model):
        block = ROTATION_BLOCK if name in ROTATED_PROJECTIONS else None
        setattr(parent, name, Int8DynamicLinear(child.weight, child.bias, rotation_block=block))
        replaced += 1
    if quantize_lm_head:
        attach_int8_logits_head(model)
        replaced += 1
    return replaced


def use_fbgemm_engine() -> None:
    """Selects the quantized engine Int8DynamicLinear packs its weights for; ValueError without one."""
    if not int8_supported():
        raise ValueError("int8 quantization needs torch's fbgemm/x86 quantized engine, which this torch lacks")
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def attach_int8_logits_head(model: nn.Module) -> None:
    """From now on the model's compute_logits uses int8_logits_head(lm_head); lm_head itself stays."""
    if not hasattr(model, "logits_head"):
        raise ValueError(f"{type(model).__name__} has no logits_head to quantize the lm_head into")
    use_fbgemm_engine()
    model.logits_head = int8_logits_head(model.lm_head.weight)


def int8_logits_head(lm_head_weight: torch.Tensor) -> Int8DynamicLinear:
    """An int8 vocabulary projection (hidden [T, H] -> logits [T, V]) with a Hadamard-16 rotated input.

    Used by quantize_model_int8(quantize_lm_head=True), the engine's default with int8 (off with
    `--quantize-lm-head false`): batch-1 decode reads the whole vocab matrix every token, 113 MB in
    fp32 for SmolLM2: 9.0 ms at M=1 vs ~1 ms for this (2 threads), ~1.4x faster batch-1 decode.
    Measured on SmolLM2-135M on top of the default int8 body: KL 0.0060 -> 0.0074, perplexity
    +0.1%, teacher-forced agreement 95.9% (vs 96.9%). Unrotated it measured KL 0.0097 / 95.7%, and
    94.3% without the down_proj rotation: keep both rotations if this is used."""
    return Int8DynamicLinear(lm_head_weight, None, rotation_block=ROTATION_BLOCK, fused_max_rows=LOGITS_FUSED_MAX_ROWS)
