"""The kernels deterministic mode pins (worker/planner.py BATCH_INVARIANT_KERNELS): a row's output is bit-identical
whatever the rows beside it and their number; and the one that is left out (torch's float32 GEMM) is not."""

from __future__ import annotations

import sys

import pytest
import torch

from tokenmill.kernels.cpu.f32_gemm import f32_panels_available
from tokenmill.kernels.cpu.int4_gemm import int4_gemm_available
from tokenmill.layers.panel_linear import PanelLinear
from tokenmill.quant.int4_cpu import Int4GroupLinear
from tokenmill.quant.int8_cpu import int8_logits_head, int8_supported

ROW_COUNTS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 100, 257)
K, N = 192, 320


def _differs(module: torch.nn.Module, seed: int = 0) -> list[tuple[int, int]]:
    """(rows, position) where row `position` of a batch of `rows` differs from that row alone."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, K, generator=gen)
    alone = module(x0)[0]
    bad = []
    for rows in ROW_COUNTS:
        for pos in sorted({0, rows // 2, rows - 1}):
            x = torch.randn(rows, K, generator=gen)
            x[pos] = x0[0]
            if not torch.equal(module(x)[pos], alone):
                bad.append((rows, pos))
    return bad


def _weight() -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05


@pytest.mark.skipif(not f32_panels_available(), reason="the C float32 panel GEMM is not built here")
def test_f32_panels_are_batch_invariant() -> None:
    assert _differs(PanelLinear(_weight(), None)) == []


@pytest.mark.skipif(not int8_supported(), reason="the C int8 kernels are not built here")
def test_int8_panels_are_batch_invariant() -> None:
    assert _differs(int8_logits_head(_weight())) == []


@pytest.mark.skipif(not int4_gemm_available(), reason="the C int4 kernel is not built here")
def test_int4_is_batch_invariant_with_its_c_kernel_at_every_row_count() -> None:
    module = Int4GroupLinear(_weight(), None)
    assert any(rows > module.fused_max_rows for rows, _ in _differs(module))  # the dequantized GEMM route is not
    module.fused_max_rows = sys.maxsize  # as deterministic mode sets it
    assert _differs(module) == []


def test_torch_float32_gemm_is_not_batch_invariant() -> None:
    """Why deterministic mode leaves MKL out: the same row gives other bits at other row counts."""
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = _weight()
    assert _differs(linear) != []
