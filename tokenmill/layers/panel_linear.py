"""Float32 projections on the CPU through the panel GEMM (kernels/cpu/f32_panels.h).

`pack_float32_model` replaces every float32 decoder projection (quant/projections.py) by a PanelLinear
holding only the packed weight, and the vocabulary projection too when nothing else (an int8 head) took
it. A tied embedding table then reads its rows from the lm_head's panels (PanelEmbedding), so the table
is stored once. The panel GEMM beats MKL's sgemm at every row count on the 2-core AVX2 machine,
most at decode batches (benchmarks/panel_gemm.py), and its outputs do not depend on the batch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tokenmill.kernels.cpu.bf16_gemm import bf16_panels_argmax, bf16_panels_linear, pack_bf16_panels
from tokenmill.kernels.cpu.f32_gemm import f32_panels_available, pack_panels, panels_linear, weight_rows_from_panels
from tokenmill.layers.linear import Linear
from tokenmill.models.interface import CausalLM
from tokenmill.quant.projections import float_projections

logger = logging.getLogger("tokenmill")


class PanelLinear(nn.Module):
    """y = x W^T (+ b) for a float32 W [out_features, in_features] kept as 16-channel panels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("panels", pack_panels(weight.detach()))
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def unpacked_weight(self) -> torch.Tensor:
        """The weight [out_features, in_features] back from the panels (a copy)."""
        return self.panels.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        return panels_linear(x2, self.panels, self.out_features, self.bias).reshape(*x.shape[:-1], self.out_features)


class Bf16PanelLinear(nn.Module):
    """y = x W^T (+ b) for a bfloat16 W kept as 16-channel panels of input pairs (kernels/cpu/bf16_gemm.c: AMX
    tiles or AVX512-BF16 where the CPU has them). Takes bf16 (or float32) x; returns out_dtype (bf16, or float32
    for the vocabulary projection, whose logits the sampler takes in float32), float32 accumulation."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("panels", pack_bf16_panels(weight.detach()))
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = bf16_panels_linear(x2, self.panels, self.out_features, self.bias, out_dtype=self.out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def greedy_ids(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """argmax over the output channels of forward(x) in float32 for x [M, in_features] -> [M] int64, without
        the [M, out_features] products (the same sums, so the same ids as argmax of float32 forward's); values:
        None, or a float32 [M] tensor that gets each row's largest value."""
        return bf16_panels_argmax(x, self.panels, self.out_features, self.bias, values)


class PanelEmbedding(nn.Module):
    """An embedding table read from the panels of the vocabulary projection it is tied to."""

    def __init__(self, head: PanelLinear) -> None:
        super().__init__()
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return weight_rows_from_panels(self.head.panels, ids, self.head.out_features)


def pack_float32_model(model: CausalLM) -> int:
    """Float32 CPU projections (and lm_head, when the model has no logits_head yet) -> PanelLinear.
    Returns how many were packed; 0 when the C kernel is not available."""
    if not f32_panels_available():
        logger.info("no C compiler: float32 projections keep torch's GEMM")
        return 0
    packed = 0
    for _, slot in float_projections(model):
        child = slot.module
        if child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
            slot.replace(PanelLinear(child.weight, child.bias))
            packed += 1
    head = model.vocab_projection
    if model.logits_head is None and type(head) is Linear \
            and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu":
        use_panel_head(model, PanelLinear(head.weight, head.bias))
        packed += 1
    return packed


def use_panel_head(model: CausalLM, head: PanelLinear) -> None:
    """`head` (packed from the model's vocabulary projection) replaces it; a tied embedding table then reads its rows
    from the panels."""
    model.use_packed_vocab_projection(head, PanelEmbedding)
