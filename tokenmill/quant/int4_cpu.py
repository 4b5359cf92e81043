"""W4A16 group-wise 4-bit linear layers for the CPU (`--quantization int4`).

Weights: GGUF's Q4_1 rule on groups of 32 consecutive input channels of each output channel: fp16
minimum m = min(w), fp16 scale d = (max(w) - min(w)) / 15, q = round((w - m) / d) in 0..15, so
w ~= d q + m. Every group holds its own minimum (q = 0) and, but for fp16 rounding of d, its maximum
(q = 15). A model whose weights already lie on that grid, such as a Q4_1 GGUF converted to float32
(the embedded SmolLM2 file), gets back exactly its own weights: tests/quant/test_int4.py checks it.

Activations: at up to FUSED_MAX_ROWS rows (decode steps), kernels/cpu/int4_gemm.c and the C forward
quantize every group of 32 input values to 16 bits symmetrically over its own max |x| and multiply
with vpmaddwd (int4_dot.h), so the weights' own rounding is the only error. (8-bit activation groups,
llama.cpp's Q8 blocks, measured logprobs 0.5 nat off fp32 within 4 tokens on SmolLM2: its outlier
channels cost whole groups their precision.) More rows (prefill) are bound by arithmetic, where the 16-bit
products run at a third of what the bf16 units do: they dequantize the weights and use torch's float32 GEMM
(`c_int4`), or, as the bf16 route (`c_int4_bf16`, where the execution plan measured it faster), multiply on the
bf16 units: on a CPU with AVX512-BF16 or AMX-BF16 through kernels/cpu/int4_bf16.h (each pass's pair of 16-channel
panels dequantized to bf16 in cache, the inputs rounded to bf16: the weights stay 4-bit in memory) at every row
count the plan gives it, elsewhere the dequantized weight in bf16 through oneDNN past FUSED_MAX_ROWS. The bf16
rounding of the dequantized weights (8 bits of mantissa) is far below the 4-bit grid's step; bf16 inputs move
the default model's logprobs by up to ~0.06 nat from fp32's against the 16-bit groups' 0.02 (tests/models/
test_int4.py; a bf16 model's 0.075, an int8 model's 8-bit inputs 0.26), its perplexity by noise-sized amounts
(benchmarks/quant_quality.py: -0.23% against +0.12%).

What it is for: batch-1 decode reads every weight once per token; 4-bit groups with fp16 scale and
minimum are 0.625 bytes per weight against int8's 1.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
from torch import nn

from tokenmill.kernels.cpu.int4_gemm import (
    check_int4_weights,
    int4_bf16_gemm,
    int4_dequantize,
    int4_gemm,
    int4_gemm_available,
)
from tokenmill.quant.projections import float_projections
from tokenmill.worker.capabilities import detect_capabilities

logger = logging.getLogger("tokenmill")

GROUP = 32
CHANNEL_BLOCK = 4
# Up to this many rows the W4A16 C kernel; more rows: dequantize + torch's GEMM.
FUSED_MAX_ROWS = 32


def quantize_weight_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float (K % 64 == 0) -> (packed uint8 [N_pad, K / 2], d, m float16 [N_pad / 4, K / 32, 4]) in
    kernels/cpu/int4_dot.h's layout, N_pad = N rounded up to 4 (padding channels are zero)."""
    n, k = weight.shape
    if k % 64:
        raise ValueError(f"int4 quantization needs in_features % 64 == 0, got {k}")
    w = weight.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    d = ((hi - lo) / 15.0).half()
    m = lo.half()
    d32 = d.float()
    inv = torch.where(d32 > 0, 1.0 / d32, torch.zeros_like(d32))
    q = torch.round((w - m.float().unsqueeze(2)) * inv.unsqueeze(2)).clamp_(0, 15).to(torch.uint8)
    # Pairs of groups share bytes: group 2p in the low nibbles, group 2p + 1 in the high ones.
    q = q.reshape(n, k // 64, 2, GROUP)
    packed = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, k // 2)
    n_pad = (n + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK * CHANNEL_BLOCK
    pad = n_pad - n
    packed = torch.nn.functional.pad(packed, (0, 0, 0, pad))

    def blocked(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [N_pad / 4, G, 4]
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return t.reshape(n_pad // CHANNEL_BLOCK, CHANNEL_BLOCK, k // GROUP).transpose(1, 2).contiguous()

    return packed.contiguous(), blocked(d), blocked(m)


def dequantize_weight_groups(packed: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The float32 [n, k] weights d * q + m, in torch (the C kernel's int4_dequantize does the same)."""
    check_int4_weights(packed, d, m, n, k)
    low, high = packed[:n] & 0x0F, packed[:n] >> 4
    q = torch.stack([low.reshape(n, k // 64, GROUP), high.reshape(n, k // 64, GROUP)], dim=2)
    q = q.reshape(n, k // GROUP, GROUP)

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # [N_pad / 4, G, 4] -> [n, G, 1]
        return t.transpose(1, 2).reshape(-1, k // GROUP)[:n].float().unsqueeze(2)

    return (per_channel(d) * q.float() + per_channel(m)).reshape(n, k)


@functools.cache
def bf16_units_gemm_available() -> bool:
    """Whether the bf16 route multiplies through kernels/cpu/int4_bf16.h here: the C kernels built, on a CPU that
    multiplies bf16 in hardware (elsewhere bf16_panels.h's portable loop would be far slower than torch's)."""
    return int4_gemm_available() and detect_capabilities().native_bf16


class Int4GroupLinear(nn.Module):
    """y = x @ W^T + b with group-wise 4-bit weights (the module docstring's format)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.device.type != "cpu":
            raise ValueError("int4 quantization runs on the CPU")
        self.out_features, self.in_features = weight.shape
        self.packed, self.group_scale, self.group_min = quantize_weight_groups(weight)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        # Rows up to this go through the C kernel, more through a dequantized GEMM (faster at prefill, but
        # its reductions depend on the row count: deterministic mode sets it to sys.maxsize).
        self.fused_max_rows = FUSED_MAX_ROWS
        self.prefill_dtype = torch.float32  # the dequantized GEMM's: float32 or bfloat16 (with_prefill_dtype)

    def with_prefill_dtype(self, dtype: torch.dtype) -> Int4GroupLinear:
        """This layer (the same weight tensors, not copied) with its dequantized GEMM in `dtype`."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"int4: the dequantized GEMM runs in float32 or bfloat16, not {dtype}")
        twin = copy.copy(self)
        twin.prefill_dtype = dtype
        return twin

    def dequantized_weight(self) -> torch.Tensor:
        if int4_gemm_available():
            return int4_dequantize(self.packed, self.group_scale, self.group_min, self.out_features, self.in_features)
        return dequantize_weight_groups(self.packed, self.group_scale, self.group_min, self.out_features,
                                        self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if self.prefill_dtype == torch.bfloat16 and bf16_units_gemm_available():
            y = int4_bf16_gemm(x2.contiguous(), self.packed, self.group_scale, self.group_min, self.out_features)
        elif x2.shape[0] <= self.fused_max_rows and int4_gemm_available():
            y = int4_gemm(x2.contiguous(), self.packed, self.group_scale, self.group_min, self.out_features)
        elif self.prefill_dtype == torch.bfloat16:
            y = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dequantized_weight().to(torch.bfloat16))
            y = y.float()
        else:
            y = torch.nn.functional.linear(x2, self.dequantized_weight())
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"
        if self.prefill_dtype == torch.bfloat16 and bf16_units_gemm_available():
            return f"{shape} (bf16 products over panels dequantized in cache, every row count)"
        return (f"{shape} (W4A16 C kernel up to {self.fused_max_rows} rows, dequantized "
                f"{str(self.prefill_dtype)[6:]} GEMM beyond)")


def quantize_model_int4(model: nn.Module, quantize_lm_head: bool = False) -> int:
    """Replaces the decoder's projection Linears whose in_features is a multiple of 64 in place (others
    stay float32, logged); returns how many. quantize_lm_head: the vocabulary projection goes through
    quant/int8_cpu.py's int8 head (counted in the result)."""
    replaced, kept = 0, []
    for label, slot in float_projections(model):
        child = slot.module
        if child.weight.shape[1] % 64:
            kept.append(label)
            continue
        slot.replace(Int4GroupLinear(child.weight, child.bias))
        replaced += 1
    if kept:
        logger.warning("int4: %d projections stay float32 (in_features not a multiple of 64), e.g. %s",
                       len(kept), kept[0])
    if quantize_lm_head:
        from tokenmill.quant.int8_cpu import attach_int8_logits_head

        attach_int8_logits_head(model)
        replaced += 1
    return replaced
