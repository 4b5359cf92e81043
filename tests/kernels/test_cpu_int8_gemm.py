"""The fused small-batch W8A8 kernel (kernels/cpu/int8_gemm.c) against float64 products: within the
error bound of 8-bit per-token activations, no int16 saturation at the pair budget, and its use by the
int8 linear layer for decode-sized row counts."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu.int8_gemm import int8_gemm, int8_gemm_available, int8_row_sums

pytestmark = pytest.mark.skipif(not int8_gemm_available(), reason="C kernels not built (no compiler)")


def _budget_weights(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random int8 weights with |q[2j]| + |q[2j+1]| <= 128."""
    q = torch.randint(-64, 65, (n, k), generator=gen)
    return q.to(torch.int8)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    y = int8_gemm(x, q, int8_row_sums(q), scale)
    assert y.shape == (x.shape[0], q.shape[0]) and y.dtype == torch.float32
    w = q.double() * scale.double()[:, None]
    exact = x.double() @ w.t()
    # Each activation is off by at most half its row's step, (max - min) / 255 / 2.
    step = (x.amax(dim=1) - x.amin(dim=1)).double() / 255
    bound = 0.5 * step[:, None] * w.abs().sum(dim=1)[None, :]
    err = (y.double() - exact).abs()
    assert torch.all(err <= bound * 1.001 + 1e-4 * exact.abs().max()), float((err - bound).max())
    assert err.mean() < 0.5 * bound.mean()  # rounding errors cancel on average: far under the bound


# n: multiples of the 4-row block and ragged tails; k: multiples of 32 and ragged tails; rows: odd and even.
@pytest.mark.parametrize("n,k", [(64, 576), (7, 40), (130, 1536), (5, 13), (3, 8), (12, 96)])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 7])
def test_matches_float64_within_the_activation_rounding_bound(n: int, k: int, num_rows: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k + num_rows)
    q = _budget_weights(n, k, gen)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    x = torch.randn(num_rows, k, generator=gen) + torch.randn(num_rows, 1, generator=gen)  # off-centre rows
    _check(x, q, scale)


def test_no_saturation_at_the_pair_budget() -> None:
    # Every pair at the budget with the sign of the largest activations: vpmaddubsw's int16 pair sums
    # reach 255 * 128 = 32640, the most the budget allows.
    k = 256
    q = torch.tensor([[127, 1] * (k // 2), [64, 64] * (k // 2), [-127, -1] * (k // 2)], dtype=torch.int8)
    x = torch.ones(2, k)
    x[:, ::4] = -1.0  # row min -1 -> u = 0 there, 255 elsewhere
    _check(x, q, torch.ones(3))


def test_reads_strided_rows_and_constant_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    q = _budget_weights(12, 32, gen)
    scale, row_sums = torch.rand(12, generator=gen), int8_row_sums(q)
    wide = torch.randn(3, 48, generator=gen)
    x = wide[:, 8:40]  # rows 48 floats apart
    torch.testing.assert_close(int8_gemm(x, q, row_sums, scale), int8_gemm(x.contiguous(), q, row_sums, scale))
    const = torch.full((2, 32), 0.75)
    torch.testing.assert_close(int8_gemm(const, q, row_sums, scale), const @ (q.float() * scale[:, None]).t())


def test_rejects_mismatched_inputs() -> None:
    q = torch.zeros(4, 16, dtype=torch.int8)
    sums, scale = int8_row_sums(q), torch.ones(4)
    with pytest.raises(ValueError, match="int8_gemm"):
        int8_gemm(torch.zeros(2, 8), q, sums, scale)
    with pytest.raises(ValueError, match="int8_gemm"):
        int8_gemm(torch.zeros(2, 16, dtype=torch.float64), q, sums, scale)


@pytest.mark.parametrize("rotation_block", [None, 16])
def test_int8_linear_uses_the_kernel_for_few_rows(rotation_block: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.quant import int8_cpu

    if not int8_cpu.int8_supported():
        pytest.skip("torch without the fbgemm/x86 quantized engine")
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen)
    layer = int8_cpu.Int8DynamicLinear(weight, bias, rotation_block=rotation_block)
    w = layer._qweight.double() * layer._scale.double()[:, None]  # the layer's (rotated) dequantized weight
    calls: list[int] = []
    monkeypatch.setattr(int8_cpu, "int8_gemm", lambda *args: calls.append(args[0].shape[0]) or int8_gemm(*args))
    for num_rows in (1, int8_cpu.FUSED_MAX_ROWS, int8_cpu.FUSED_MAX_ROWS + 1):
        x = torch.randn(num_rows, 64, generator=gen)
        xr = x if rotation_block is None else (x.reshape(-1, 16) @ int8_cpu.hadamard(16)).reshape(x.shape)
        step = (xr.amax(dim=1) - xr.amin(dim=1)).double() / 255
        bound = 0.5 * step[:, None] * w.abs().sum(dim=1)[None, :] + 1e-5
        err = (layer(x).double() - (xr.double() @ w.t() + bias.double())).abs()
        assert torch.all(err <= bound * 1.01)
    assert calls == [1, int8_cpu.FUSED_MAX_ROWS]  # more rows go to fbgemm


@pytest.mark.parametrize("block", [2, 16, 32])
def test_rotation_inside_the_kernel_matches_rotating_first(block: int) -> None:
    from tokenmill.quant.int8_cpu import hadamard

    gen = torch.Generator().manual_seed(block)
    q = _budget_weights(40, 96, gen)
    scale, row_sums = torch.rand(40, generator=gen) + 0.1, int8_row_sums(q)
    x = torch.randn(3, 96, generator=gen)
    x[:, 7] *= 30.0  # an outlier channel
    rotated = (x.reshape(-1, block) @ hadamard(block)).reshape(x.shape)
    fused = int8_gemm(x, q, row_sums, scale, rotation_block=block)
    torch.testing.assert_close(fused, int8_gemm(rotated, q, row_sums, scale), atol=1e-4, rtol=1e-4)
    for bad in (3, 64, -16):
        with pytest.raises(ValueError, match="rotation_block"):
            int8_gemm(x, q, row_sums, scale, rotation_block=bad)
