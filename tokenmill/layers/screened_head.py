"""Greedy ids of a panel vocabulary projection through an int8 screen: the same ids, from fewer bytes.

A greedy decode step needs each row's argmax, not its logits. The screen (kernels/cpu/int8_screen.c) reads an int8
copy of the vocabulary matrix (a quarter of float32's bytes, half of bf16's), scores every channel and bounds how far
each score can be from the exact logit; only the 16-channel panels where some row's largest logit can be go through
the exact projection (the head's own panel kernel on those panels: the same sums, so the same logits as the whole
projection computes), whose argmax is the answer. With SmolLM2's head and real decode rows, a row keeps a median of
3 channels (p99 32) of 49,152.

The bound is rigorous, not statistical: with s_n the channel's int8 step, |x . w_n - s_n (x . q_n)| <= (s_n / 2)
|x|_1 for the weight's rounding, and each float32 sum of k products is within k 2^-24 sum |x_i w_i| <= k 127 s_n 2^-24
|x|_1 of its exact value (both the screen's and the exact kernel's); the screen's own roundings (the scale, |x|_1,
the comparisons) are each within 2^-24 of values below 127 max_j s_j |x|_1, which SLACK max_j s_j |x|_1 covers many
times over. So the channel of the largest exact logit always passes the screen, and ties keep the lowest id (as
argmax).

The screen reads 28 MB for SmolLM2 where the bf16 head reads 57 MB: at batch 1 (memory-bound) the head's time
halves; at many rows the screen's float32 products cost more than bf16 ones, so the plan times both per row count
(the "greedy_head" operation).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.cpu.bf16_gemm import bf16_panels_argmax
from tokenmill.kernels.cpu.f32_gemm import panels_linear
from tokenmill.kernels.cpu.int8_screen import PANEL, int8_screen, int8_screen_available, pack_screen_weight
from tokenmill.kernels.cpu.layer_ops import rows_max
from tokenmill.layers.panel_linear import Bf16PanelLinear, PanelLinear

SCREEN_KERNEL = "c_int8_screen"  # the execution plan's name for it (operation "greedy_head")
SLACK = 0.01


def screen_bounds(scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """b_n / |x|_1 per channel: half a step for the weight's rounding, both float32 sums' rounding (2 k 127 2^-24
    steps), and SLACK of the largest step for the screen's own roundings."""
    return (scales * (0.5 + 2 * in_features * 127 * 2.0**-24) + SLACK * scales.max()).float().contiguous()


class ScreenedGreedyHead(nn.Module):
    """greedy_ids of `head` (a PanelLinear, or a Bf16PanelLinear with float32 outputs; no bias) through the int8
    screen of its weight [out_features, in_features]."""

    @staticmethod
    def takes(head: nn.Module) -> bool:
        """Whether `head` is a projection the screen can stand in front of (and the C kernel is built here)."""
        return (isinstance(head, (PanelLinear, Bf16PanelLinear)) and head.bias is None and int8_screen_available()
                and (not isinstance(head, Bf16PanelLinear) or head.out_dtype == torch.float32))

    def __init__(self, head: PanelLinear | Bf16PanelLinear, weight: torch.Tensor) -> None:
        super().__init__()
        if not self.takes(head):
            raise ValueError("the int8 screen takes a panel vocabulary projection without bias (bf16: float32 "
                             "outputs), and the C kernel")
        self.head = head
        self.out_features, self.in_features = head.out_features, head.in_features
        panels, scales = pack_screen_weight(weight)
        self.register_buffer("screen_panels", panels)
        self.register_buffer("screen_scales", scales)
        self.register_buffer("screen_bounds", screen_bounds(scales, self.in_features))

    def greedy_ids(self, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """argmax over the head's float32 logits of x [M, in_features] -> [M] int64, the lowest id among equal
        values (as the head's own greedy_ids or argmax of its forward); values: None, or a float32 [M] tensor that
        gets each row's largest logit."""
        x = x.reshape(-1, self.in_features)
        bf16 = isinstance(self.head, Bf16PanelLinear)
        passed = int8_screen(x, self.screen_panels, self.screen_scales, self.screen_bounds, self.out_features, bf16)
        if not len(passed):  # only non-finite rows fail every comparison: the whole projection decides
            return head_greedy_ids(self.head, x, values)
        panels = self.head.panels.index_select(0, passed)
        # Ascending panels keep argmax's tie order; the last panel's channels past out_features are left out.
        n = len(passed) * PANEL - (self.head.panels.shape[0] * PANEL - self.out_features
                                   if int(passed[-1]) == self.head.panels.shape[0] - 1 else 0)
        if bf16:
            local = bf16_panels_argmax(x, panels, n, None, values)
        else:
            best, local = panels_linear(x.float().contiguous(), panels, n, None).max(dim=1)
            if values is not None:
                values.copy_(best)
        return passed[local // PANEL] * PANEL + local % PANEL


def head_greedy_ids(head: nn.Module, x: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """greedy ids of a vocabulary projection as its own kernel gives them: the bf16 panels' fused argmax, else argmax
    over its float32 logits (the sampler's); values: None, or a float32 [M] tensor that gets each row's largest."""
    if isinstance(head, Bf16PanelLinear):
        return head.greedy_ids(x, values)
    best, ids = rows_max(head(x).float().contiguous())
    if values is not None:
        values.copy_(best)
    return ids
