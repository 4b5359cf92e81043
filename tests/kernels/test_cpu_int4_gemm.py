"""Group-wise 4-bit weights (quant/int4_cpu.py) and the W4A16 kernel (kernels/cpu/int4_gemm.c): the Q4_1
rule and its packing, exact round trips of weights already on the grid, the product against float64
within the 16-bit activation rounding bound, and the linear layer's two paths; the bf16 route (int4_bf16.h): its
dequantized panels bitwise the float32 weights rounded to bf16 and packed, its product that of the bf16-rounded
operands."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tokenmill.kernels.cpu.bf16_gemm import pack_bf16_panels
from tokenmill.kernels.cpu.int4_gemm import (
    int4_bf16_gemm,
    int4_bf16_panels,
    int4_dequantize,
    int4_gemm,
    int4_gemm_available,
)
from tokenmill.layers.linear import Linear
from tokenmill.models.interface import Projection
from tokenmill.quant.int4_cpu import (
    FUSED_MAX_ROWS,
    Int4GroupLinear,
    bf16_units_gemm_available,
    dequantize_weight_groups,
    quantize_model_int4,
    quantize_weight_groups,
)

pytestmark = pytest.mark.skipif(not int4_gemm_available(), reason="C kernels not built (no compiler)")


def _q4_1_grid_weights(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Weights as a Q4_1 GGUF dequantizes them: fp16 d and m per group of 32, q in 0..15 with every group
    holding a 0 and a 15 (the rule puts each group's min at 0 and its max at 15)."""
    d = (torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=gen) * 0.1).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[:, :, 3], q[:, :, 17] = 0.0, 15.0
    return (d * q + m).reshape(n, k)


def test_quantization_follows_the_q4_1_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(9, 128, generator=gen) * 0.05
    packed, d, m = quantize_weight_groups(weight)
    assert packed.shape == (12, 64) and packed.dtype == torch.uint8  # 9 channels padded to 12
    assert d.shape == m.shape == (3, 4, 4) and d.dtype == m.dtype == torch.float16
    groups = weight.reshape(9, 4, 32)
    d_rows = d.transpose(1, 2).reshape(12, 4)[:9].float()
    m_rows = m.transpose(1, 2).reshape(12, 4)[:9].float()
    assert torch.equal(m_rows, groups.amin(dim=2).half().float())
    torch.testing.assert_close(d_rows, (groups.amax(dim=2) - groups.amin(dim=2)) / 15, rtol=1e-3, atol=0)
    assert torch.all(packed[9:] == 0) and torch.all(d.transpose(1, 2).reshape(12, 4)[9:] == 0)
    back = dequantize_weight_groups(packed, d, m, 9, 128)
    # Within half a step of the fp16-rounded grid (plus the fp16 rounding of the minimum).
    step = d_rows.repeat_interleave(32, dim=1)
    assert torch.all((back - weight).abs() <= 0.5 * step + 1e-3 * weight.abs().max())
    # Nibble order: the first 32 inputs of a 64-wide pair sit in the low nibbles.
    q = torch.round((weight[0, :64] - back[0, :64].min()) / d_rows[0, 0]).clamp(0, 15)
    assert torch.equal((packed[0, :32] & 0x0F).float(), q[:32])


@pytest.mark.parametrize("n,k", [(8, 64), (7, 128), (130, 576)])
def test_weights_on_the_grid_come_back_bitwise(n: int, k: int) -> None:
    """A Q4_1 GGUF's weights (the embedded model's) are reproduced exactly: the layer computes with the
    file's own weights."""
    weight = _q4_1_grid_weights(n, k, torch.Generator().manual_seed(n + k))
    packed, d, m = quantize_weight_groups(weight)
    assert torch.equal(dequantize_weight_groups(packed, d, m, n, k), weight)
    assert torch.equal(int4_dequantize(packed, d, m, n, k), weight)
    again = quantize_weight_groups(int4_dequantize(packed, d, m, n, k))
    assert all(torch.equal(a, b) for a, b in zip(again, (packed, d, m)))


# n: multiples of the 4-channel block and ragged tails; k: one and several 64-wide pairs.
@pytest.mark.parametrize("n,k", [(64, 576), (7, 64), (130, 1536), (5, 128), (12, 192)])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 7, 40])
def test_matches_float64_within_the_activation_rounding_bound(n: int, k: int, num_rows: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k + num_rows)
    weight = torch.randn(n, k, generator=gen) * 0.05
    packed, d, m = quantize_weight_groups(weight)
    w = dequantize_weight_groups(packed, d, m, n, k).double()
    x = torch.randn(num_rows, k, generator=gen) + torch.randn(num_rows, 1, generator=gen)
    x[:, 5] *= 50.0  # an outlier channel: it coarsens only its own group
    y = int4_gemm(x, packed, d, m, n)
    assert y.shape == (num_rows, n) and y.dtype == torch.float32
    exact = x.double() @ w.t()
    # Each activation is off by at most half its group's step, max|x| / 32767 / 2 (the minimum term
    # uses the exact group sums).
    step = x.reshape(num_rows, -1, 32).abs().amax(dim=2).double() / 32767
    d_w = (w - w.reshape(n, -1, 32).amin(dim=2).repeat_interleave(32, dim=1)).abs()  # |d q| per weight
    bound = 0.5 * step @ d_w.reshape(n, -1, 32).sum(dim=2).t()
    err = (y.double() - exact).abs()
    assert torch.all(err <= bound * 1.01 + 1e-5 * exact.abs().max()), float((err - bound).max())


@pytest.mark.parametrize("n, k", [(3072, 576), (20, 1536)])
def test_a_rows_result_does_not_depend_on_its_batch(n: int, k: int) -> None:
    """Rows are multiplied in blocks (int4_dot.h's INT4_ROW_BLOCK); every row gives bitwise what it gives alone,
    whatever the number of rows and the block it falls in."""
    gen = torch.Generator().manual_seed(3)
    packed, d, m = quantize_weight_groups(torch.randn(n, k, generator=gen) * 0.05)
    x = torch.randn(16, k, generator=gen)
    alone = torch.cat([int4_gemm(x[i : i + 1], packed, d, m, n) for i in range(16)])
    for num_rows in (2, 3, 4, 5, 7, 16):
        assert torch.equal(int4_gemm(x[:num_rows], packed, d, m, n), alone[:num_rows]), num_rows


def test_reads_strided_rows_and_zero_groups() -> None:
    gen = torch.Generator().manual_seed(1)
    packed, d, m = quantize_weight_groups(torch.randn(12, 128, generator=gen))
    wide = torch.randn(3, 160, generator=gen)
    wide[1, 16:48] = 0.0  # an all-zero group: step 1, a = 0
    x = wide[:, 16:144]
    torch.testing.assert_close(int4_gemm(x, packed, d, m, 12), int4_gemm(x.contiguous(), packed, d, m, 12))
    w = int4_dequantize(packed, d, m, 12, 128)
    expected = x @ w.t()
    # 16-bit activations: off by ~1e-4 of the outputs' scale, not more.
    got = int4_gemm(x, packed, d, m, 12)
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-4 * float(expected.abs().max()))


# n: whole panel pairs, a lone last panel, ragged channels past the 4-channel padding; k: one and several 64-wide pairs.
@pytest.mark.parametrize("n,k", [(64, 576), (48, 64), (7, 128), (130, 1536)])
def test_bf16_panels_are_the_dequantized_weights_rounded_to_bf16(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    packed, d, m = quantize_weight_groups(torch.randn(n, k, generator=gen) * 0.05)
    expected = pack_bf16_panels(int4_dequantize(packed, d, m, n, k).to(torch.bfloat16))
    assert torch.equal(int4_bf16_panels(packed, d, m, n, k).view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("n,k", [(64, 576), (7, 128), (130, 1536)])
@pytest.mark.parametrize("num_rows", [1, 5, 16, 33, 300])
def test_bf16_product_is_that_of_the_bf16_operands(n: int, k: int, num_rows: int) -> None:
    """Sums in float32 of bf16(x) bf16(w): within float32 summation error of the float64 product of the rounded
    operands, whatever the rows (vdpbf16ps rows, AMX blocks and a padded last block, several row chunks at 300 x
    1536), read from strided rows."""
    gen = torch.Generator().manual_seed(n * 7 + k + num_rows)
    packed, d, m = quantize_weight_groups(torch.randn(n, k, generator=gen) * 0.05)
    wide = torch.randn(num_rows, k + 32, generator=gen)
    x = wide[:, 16 : 16 + k]
    y = int4_bf16_gemm(x, packed, d, m, n)
    w = int4_dequantize(packed, d, m, n, k).to(torch.bfloat16).double()
    exact = x.to(torch.bfloat16).double() @ w.t()
    assert y.shape == (num_rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=1e-5 * k ** 0.5 * float(exact.abs().max()))


def test_rejects_bad_inputs() -> None:
    packed, d, m = quantize_weight_groups(torch.randn(8, 64))
    with pytest.raises(ValueError, match="64"):
        quantize_weight_groups(torch.randn(8, 96))
    with pytest.raises(ValueError, match="float32"):
        int4_gemm(torch.randn(2, 64).double(), packed, d, m, 8)
    with pytest.raises(ValueError, match="packed"):
        int4_gemm(torch.randn(2, 64), packed[:4], d, m, 8)
    with pytest.raises(ValueError, match="scales"):
        int4_gemm(torch.randn(2, 64), packed, d.float(), m, 8)
    with pytest.raises(ValueError, match="64"):
        int4_gemm(torch.randn(2, 32), packed, d, m, 8)
    with pytest.raises(ValueError, match="float32"):
        int4_bf16_gemm(torch.randn(2, 64).bfloat16(), packed, d, m, 8)
    with pytest.raises(ValueError, match="packed"):
        int4_bf16_gemm(torch.randn(2, 64), packed[:4], d, m, 8)


@pytest.mark.parametrize("num_rows", [1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1, 100])
def test_linear_layer_both_paths(num_rows: int) -> None:
    """The C kernel up to FUSED_MAX_ROWS rows, the dequantized float32 GEMM beyond: both the product
    with the layer's 4-bit weights (plus the bias), in the input's dtype and leading shape."""
    gen = torch.Generator().manual_seed(num_rows)
    weight, bias = torch.randn(20, 128, generator=gen) * 0.05, torch.randn(20, generator=gen)
    layer = Int4GroupLinear(weight, bias)
    x = torch.randn(1, num_rows, 128, generator=gen)
    expected = x @ layer.dequantized_weight().t() + bias
    y = layer(x)
    assert y.shape == (1, num_rows, 20)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    # Half a step of the widest group at most (its range is under 2 max|w|, over 15 steps).
    half_step = 0.5 * 2 * float(weight.abs().max()) / 15
    torch.testing.assert_close(layer.dequantized_weight(), weight, rtol=0, atol=half_step)


@pytest.mark.parametrize("num_rows", [1, 4, FUSED_MAX_ROWS + 1])
def test_linear_layer_bf16_route(num_rows: int) -> None:
    """with_prefill_dtype(bf16) (the plan's c_int4_bf16): the same weight tensors; where the CPU multiplies bf16,
    int4_bf16_gemm at every row count (plus the bias), else the float32 route up to FUSED_MAX_ROWS rows and the
    dequantized weight in bf16 beyond; within bf16 rounding of the float32 route either way."""
    gen = torch.Generator().manual_seed(num_rows)
    weight, bias = torch.randn(20, 128, generator=gen) * 0.05, torch.randn(20, generator=gen)
    layer = Int4GroupLinear(weight, bias)
    twin = layer.with_prefill_dtype(torch.bfloat16)
    assert twin.packed is layer.packed and twin.group_scale is layer.group_scale
    assert layer.prefill_dtype == torch.float32
    x = torch.randn(num_rows, 128, generator=gen)
    if bf16_units_gemm_available():
        torch.testing.assert_close(twin(x), int4_bf16_gemm(x, layer.packed, layer.group_scale, layer.group_min, 20)
                                   + bias, rtol=0, atol=0)
    elif num_rows <= FUSED_MAX_ROWS:
        assert torch.equal(twin(x), layer(x))
    ref = layer(x)
    torch.testing.assert_close(twin(x), ref, rtol=0, atol=0.02 * ref.abs().max().item())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        layer.with_prefill_dtype(torch.float16)


def test_model_quantization_keeps_projections_it_cannot_pack() -> None:
    """in_features not a multiple of 64: that projection stays float32 (and the C forward reads it as such)."""
    block = torch.nn.Module()
    block.qkv_proj, block.down_proj, block.other = Linear(64, 24), Linear(96, 64), Linear(64, 8)
    for linear in (block.qkv_proj, block.down_proj, block.other):
        torch.nn.init.normal_(linear.weight)

    class OneLayer:  # the part of the causal-LM interface (models/interface.py) the quantizer reads
        def decoder_layers(self) -> list:
            return [SimpleNamespace(projections=(Projection("qkv_proj", block, "qkv_proj"),
                                                 Projection("down_proj", block, "down_proj")))]

    assert quantize_model_int4(OneLayer()) == 1
    assert isinstance(block.qkv_proj, Int4GroupLinear)
    assert type(block.down_proj) is Linear and type(block.other) is Linear
