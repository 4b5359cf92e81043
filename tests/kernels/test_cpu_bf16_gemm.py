"""The bf16 panel GEMM (kernels/cpu/bf16_gemm.c: AMX tiles, AVX512-BF16 or portable loops, whichever this CPU
has) against float32 products of the same bf16 values."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu.bf16_gemm import (
    bf16_panels_argmax,
    bf16_panels_available,
    bf16_panels_linear,
    pack_bf16_panels,
)
from tokenmill.layers.panel_linear import Bf16PanelLinear

pytestmark = pytest.mark.skipif(not bf16_panels_available(), reason="C kernels not built (no compiler)")


# rows: single rows and partial AMX blocks (1-15 tile rows; vdpbf16ps rows without AMX), whole 16-row blocks, pairs
# of them and an odd last one, a row chunk boundary; k and n: multiples of the blocks, and not.
@pytest.mark.parametrize("m", [1, 2, 7, 15, 16, 17, 33, 48, 64, 300])
@pytest.mark.parametrize("k, n", [(64, 48), (576, 960), (100, 33), (40, 20)])
def test_bf16_panels_match_float32_products(m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen)
    panels = pack_bf16_panels(w)
    exact = x.double() @ w.double().t() + bias.double()
    y = bf16_panels_linear(x, panels, n, bias, out_dtype=torch.float32)
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-4 * exact.abs().max().item())
    y16 = bf16_panels_linear(x, panels, n, bias)
    assert y16.dtype == torch.bfloat16
    # bf16 rounding of (nearly) the same float32 sums: at most one step apart
    torch.testing.assert_close(y16.float(), y.bfloat16().float(), rtol=2 ** -7, atol=1e-6)


def test_bf16_panel_linear_module_and_float32_input() -> None:
    w = torch.randn(70, 96).bfloat16()
    layer = Bf16PanelLinear(w, None)
    x = torch.randn(2, 5, 96)
    out = layer(x)  # float32 input is rounded to bf16 first, as torch's bf16 product would see it
    assert out.shape == (2, 5, 70) and out.dtype == torch.bfloat16
    ref = (x.bfloat16().float().reshape(-1, 96) @ w.float().t()).bfloat16().reshape(2, 5, 70)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


def test_bf16_panel_linear_can_write_float32_logits() -> None:
    """The vocabulary projection's candidate writes its float32 sums directly (the sampler's dtype)."""
    w = torch.randn(300, 64).bfloat16()
    x = torch.randn(3, 64).bfloat16()
    logits = Bf16PanelLinear(w, None, torch.float32)(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), x.double() @ w.double().t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [1, 5, 16, 17, 64])
@pytest.mark.parametrize("n, bias", [(1000, False), (333, True), (17, True)])
def test_bf16_panels_argmax_is_argmax_of_the_float32_products(m: int, n: int, bias: bool) -> None:
    """The greedy vocabulary projection: the same ids as argmax over bf16_panels_linear's float32 output, ties
    (duplicate weight rows, in different panels and pairs) going to the lowest channel as torch's max does."""
    gen = torch.Generator().manual_seed(m * 7 + n)
    k = 96
    w = torch.randn(n, k, generator=gen).bfloat16()
    w[n - 1] = w[n // 2] = w[3]  # equal channels: equal sums
    x = torch.randn(m, k, generator=gen).bfloat16()
    x[0] = w[3].float() * 4  # row 0's largest value is the tied one
    b = torch.randn(n, generator=gen) if bias else None
    if b is not None:
        b[n - 1] = b[n // 2] = b[3]
    panels = pack_bf16_panels(w)
    logits = bf16_panels_linear(x, panels, n, b, out_dtype=torch.float32)
    ids = bf16_panels_argmax(x, panels, n, b)
    assert ids.dtype == torch.int64 and ids.shape == (m,)
    assert torch.equal(ids, logits.max(dim=-1).indices)
    assert ids[0].item() == 3
    values = torch.empty(m)
    assert torch.equal(Bf16PanelLinear(w, b, torch.float32).greedy_ids(x, values), ids)
    assert torch.equal(values, logits.max(dim=-1).values)  # the values too (tensor parallelism compares them)
