"""The W8A8 panel kernel (kernels/cpu/int8_gemm.c, int8_panels.h) against float64 products: the panel
layout, within the error bound of 8-bit (and 7-bit, the paired tile) per-token activations at every tile
shape, no int16 saturation at the pair budget, rows independent of their batch, the fused Hadamard rotation,
and the int8 layer."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu.int8_gemm import (
    int8_gemm_available,
    int8_panels_gemm,
    pack_int8_panels,
    padded_channels,
    padded_row_sums,
)
from tokenmill.worker.capabilities import detect_capabilities

pytestmark = pytest.mark.skipif(not int8_gemm_available(), reason="C kernels not built (no compiler)")


def _budget_weights(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random int8 weights with |q[2j]| + |q[2j+1]| <= 128."""
    return torch.randint(-64, 65, (n, k), generator=gen).to(torch.int8)


def _gemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rotation_block: int = 0,
          bias: torch.Tensor | None = None, activation_bits: int = 8) -> torch.Tensor:
    padded = torch.zeros(padded_channels(q.shape[0]))
    padded[: q.shape[0]] = scale
    return int8_panels_gemm(x, pack_int8_panels(q), padded_row_sums(q), padded, q.shape[0], rotation_block, bias,
                            activation_bits)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
           activation_bits: int = 8) -> None:
    y = _gemm(x, q, scale, bias=bias, activation_bits=activation_bits)
    assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == torch.float32
    w = q.double() * scale.double()[:, None]
    exact = x.double() @ w.t() + (0 if bias is None else bias.double())
    # Each activation is off by at most half its row's step, (max - min) / levels / 2.
    step = (x.amax(dim=1) - x.amin(dim=1)).double() / (2**activation_bits - 1)
    bound = 0.5 * step[:, None] * w.abs().sum(dim=1)[None, :]
    err = (y.double() - exact).abs()
    assert torch.all(err <= bound * 1.001 + 1e-4 * exact.abs().max()), float((err - bound).max())
    assert err.mean() < 0.5 * bound.mean()  # rounding errors cancel on average: far under the bound


def test_panel_layout() -> None:
    q = _budget_weights(37, 10, torch.Generator().manual_seed(0))
    panels = pack_int8_panels(q)
    assert panels.shape == (3, 3, 16, 4)
    for c in range(37):
        for i in range(10):
            assert panels[c // 16, i // 4, c % 16, i % 4] == q[c, i]
    assert torch.all(panels[2, :, 5:] == 0) and torch.all(panels[:, 2, :, 2:] == 0)  # channels 37.., inputs 10..
    assert torch.equal(padded_row_sums(q)[:37], q.sum(dim=1, dtype=torch.int32))


# n: whole panels and ragged tails; k: whole quads and ragged tails; rows: full tiles (5 rows; 4 for the
# paired 7-bit tile) and every remainder.
@pytest.mark.parametrize("n,k", [(64, 576), (7, 44), (130, 1536), (5, 13), (3, 8), (12, 100), (4, 3)])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 7, 13])
@pytest.mark.parametrize("activation_bits", [8, 7])
def test_matches_float64_within_the_activation_rounding_bound(n: int, k: int, num_rows: int,
                                                              activation_bits: int) -> None:
    """k with an odd number of quads (44, 100, 3) leaves the paired tile (7 bits) one quad on its own; k = 3
    has no pair at all."""
    gen = torch.Generator().manual_seed(n * 1000 + k + num_rows)
    q = _budget_weights(n, k, gen)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    x = torch.randn(num_rows, k, generator=gen) + torch.randn(num_rows, 1, generator=gen)  # off-centre rows
    _check(x, q, scale, torch.randn(n, generator=gen) if num_rows % 2 else None, activation_bits)


@pytest.mark.parametrize("activation_bits", [8, 7])
def test_no_saturation_at_the_pair_budget(activation_bits: int) -> None:
    # Every pair at the budget with the sign of the largest activations: vpmaddubsw's int16 pair sums
    # reach 255 * 128 = 32640, the most the budget allows; the 7-bit tile's int16 sums of two pairs
    # reach 127 * 256 = 32512.
    k = 256
    q = torch.tensor([[127, 1] * (k // 2), [64, 64] * (k // 2), [-127, -1] * (k // 2)], dtype=torch.int8)
    x = torch.ones(2, k)
    x[:, ::4] = -1.0  # row min -1 -> u = 0 there, the top level elsewhere
    _check(x, q, torch.ones(3), activation_bits=activation_bits)


@pytest.mark.parametrize("activation_bits", [8, 7])
def test_rows_do_not_depend_on_their_batch(activation_bits: int) -> None:
    """Bitwise: a row alone (the plain tile), in a tile (7 bits: the paired one), in a remainder and past a
    row chunk (k = 8192 makes the chunk 20 rows, so 50 rows span three); k = 100 has an odd number of quads.
    On a CPU with AMX-INT8, 16-row blocks of k = 576 and 8192 (whole 64-input tiles) take the AMX tiles."""
    for n, k in ((40, 96), (20, 8192), (24, 100), (48, 576)):
        gen = torch.Generator().manual_seed(k)
        q, scale = _budget_weights(n, k, gen), torch.rand(n, generator=gen)
        x = torch.randn(50, k, generator=gen)
        alone = torch.cat([_gemm(x[i : i + 1], q, scale, activation_bits=activation_bits) for i in range(50)])
        for rows in (1, 4, 5, 6, 21, 50):
            batched = _gemm(x[:rows], q, scale, activation_bits=activation_bits)
            assert torch.equal(batched, alone[:rows]), (n, k, rows)


def test_reads_strided_rows_and_constant_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    q = _budget_weights(12, 32, gen)
    scale = torch.rand(12, generator=gen)
    wide = torch.randn(3, 48, generator=gen)
    x = wide[:, 8:40]  # rows 48 floats apart
    torch.testing.assert_close(_gemm(x, q, scale), _gemm(x.contiguous(), q, scale))
    const = torch.full((2, 32), 0.75)
    torch.testing.assert_close(_gemm(const, q, scale), const @ (q.float() * scale[:, None]).t())
    assert _gemm(torch.empty(0, 32), q, scale).shape == (0, 12)


def test_rejects_mismatched_inputs() -> None:
    q = torch.zeros(4, 16, dtype=torch.int8)
    panels, sums, scale = pack_int8_panels(q), padded_row_sums(q), torch.ones(16)
    with pytest.raises(ValueError, match="panels"):
        int8_panels_gemm(torch.zeros(2, 8), panels, sums, scale, 4)  # k does not chain
    with pytest.raises(ValueError, match="x must"):
        int8_panels_gemm(torch.zeros(2, 16, dtype=torch.float64), panels, sums, scale, 4)
    with pytest.raises(ValueError, match="scales"):
        int8_panels_gemm(torch.zeros(2, 16), panels, sums, torch.ones(4), 4)  # not padded to the panel
    with pytest.raises(ValueError, match="bias"):
        int8_panels_gemm(torch.zeros(2, 16), panels, sums, scale, 4, bias=torch.ones(5))
    with pytest.raises(ValueError, match="int8 matrix"):
        pack_int8_panels(q.float())


@pytest.mark.parametrize("block", [2, 16, 32])
def test_rotation_inside_the_kernel_matches_rotating_first(block: int) -> None:
    from tokenmill.quant.int8_cpu import hadamard

    gen = torch.Generator().manual_seed(block)
    q = _budget_weights(40, 96, gen)
    scale = torch.rand(40, generator=gen) + 0.1
    x = torch.randn(3, 96, generator=gen)
    x[:, 7] *= 30.0  # an outlier channel
    rotated = (x.reshape(-1, block) @ hadamard(block)).reshape(x.shape)
    fused = _gemm(x, q, scale, rotation_block=block)
    torch.testing.assert_close(fused, _gemm(rotated, q, scale), atol=1e-4, rtol=1e-4)
    for bad in (3, 64, -16):
        with pytest.raises(ValueError, match="rotation_block"):
            _gemm(x, q, scale, rotation_block=bad)


@pytest.mark.parametrize("rotation_block", [None, 16])
def test_int8_linear_at_every_row_count(rotation_block: int | None) -> None:
    """The layer runs the kernel for decode-sized and prefill-sized batches alike: within the
    activation rounding bound of its own (rotated) dequantized weights."""
    from tokenmill.quant import int8_cpu

    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen)
    layer = int8_cpu.Int8DynamicLinear(weight, bias, rotation_block=rotation_block)
    w = layer.dequantized_weight().double()
    for num_rows in (1, 16, 17, 300):
        x = torch.randn(num_rows, 64, generator=gen)
        xr = x if rotation_block is None else (x.reshape(-1, 16) @ int8_cpu.hadamard(16)).reshape(x.shape)
        step = (xr.amax(dim=1) - xr.amin(dim=1)).double() / 255
        bound = 0.5 * step[:, None] * w.abs().sum(dim=1)[None, :] + 1e-5
        err = (layer(x).double() - (xr.double() @ w.t() + bias.double())).abs()
        assert torch.all(err <= bound * 1.01)


_TILE_OUTPUTS = """
import sys, torch
from tokenmill.kernels.cpu.int8_gemm import int8_panels_gemm, pack_int8_panels, padded_channels, padded_row_sums
gen = torch.Generator().manual_seed(3)
out = []
for m, n, k, bits in ((1, 40, 64, 8), (7, 33, 96, 8), (13, 48, 128, 7), (37, 70, 256, 8)):
    q = torch.randint(-64, 65, (n, k), generator=gen).to(torch.int8)
    scale = torch.zeros(padded_channels(n))
    scale[:n] = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    out.append(int8_panels_gemm(x, pack_int8_panels(q), padded_row_sums(q), scale, n, 0, bias, bits))
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(not detect_capabilities().has("avx512_vnni"), reason="no AVX512-VNNI here: one tile family only")
def test_vnni_and_avx2_tiles_give_the_same_outputs_bit_for_bit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """int8_vnni.h's tiles against int8_panels.h's AVX2 ones (the kernel built with -mno-avx512vnni, in a process of
    its own): exact int32 sums and one epilogue, so the same floats at every tile and remainder shape."""
    import os
    import subprocess
    import sys

    outputs = []
    for extra in ("", "-mno-avx512vnni"):
        path = tmp_path / f"out{len(outputs)}.pt"
        env = dict(os.environ, TOKENMILL_KERNEL_CFLAGS=extra)
        subprocess.run([sys.executable, "-c", _TILE_OUTPUTS, str(path)], env=env, check=True, timeout=300)
        outputs.append(torch.load(path))
    for vnni, avx2 in zip(*outputs, strict=True):
        assert torch.equal(vnni, avx2)
