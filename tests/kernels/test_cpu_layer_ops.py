"""The C layer kernels (kernels/cpu/layer_ops.c) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention import torch_backend
from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels.cpu import layer_ops
from tokenmill.kernels.cpu.kv_cache import kv_row_width, kv_values
from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(not layer_ops.layer_ops_available(), reason="C kernels not built (no compiler)")

TOL = {"atol": 2e-5, "rtol": 2e-5}


# One bf16 rounding step of a value of magnitude up to ~8: the kernel and torch may round a float32 result that
# differs in its last bits to neighbouring bf16 values.
BF16_TOL = {"atol": 2 ** -4, "rtol": 2 ** -7}


@pytest.mark.parametrize("num_rows", [1, 5, 70])
@pytest.mark.parametrize("x_dtype, with_residual", [(torch.float32, False), (torch.bfloat16, False),
                                                     (torch.bfloat16, True)])
def test_bf16_rms_norm_keeps_a_float32_residual(num_rows: int, x_dtype: torch.dtype, with_residual: bool) -> None:
    """A bf16 model's norm (the first layer's x is the float32 embedding, later ones bf16 sublayer outputs):
    the residual stream stays float32 and is updated in place; the output is bf16 of the float32 norm."""
    gen = torch.Generator().manual_seed(num_rows)
    x = (torch.randn(num_rows, 576, generator=gen) * 3).to(x_dtype)
    residual = torch.randn(num_rows, 576, generator=gen) if with_residual else None
    norm = RMSNorm(576, 1e-5, "cpu")
    norm.weight.data = torch.randn(576, generator=torch.Generator().manual_seed(1)).bfloat16()
    total = x.float() + residual if with_residual else x.float()
    expected = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.float()).bfloat16()
    if residual is None:
        out = norm(x)
    else:
        out, new_residual = norm(x, residual)
        assert new_residual.data_ptr() == residual.data_ptr() and new_residual.dtype == torch.float32
        torch.testing.assert_close(new_residual, total, atol=0, rtol=0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), **BF16_TOL)
    # The torch path (no C kernel) gives the same dtypes: bf16 output, float32 residual.
    reference = RMSNorm(576, 1e-5, "torch")
    reference.weight.data = norm.weight.data
    ref_out = reference(x) if residual is None else reference(x, total - x.float())[0]
    assert ref_out.dtype == torch.bfloat16
    torch.testing.assert_close(ref_out.float(), expected.float(), **BF16_TOL)


@pytest.mark.parametrize("num_rows", [1, 70])
def test_bf16_silu_and_mul_matches_torch(num_rows: int) -> None:
    x = torch.randn(num_rows, 2 * 1536, generator=torch.Generator().manual_seed(num_rows)).bfloat16() * 4
    gate, up = x.float().chunk(2, dim=-1)
    out = SiluAndMul("cpu")(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (torch.nn.functional.silu(gate) * up).bfloat16().float(), **BF16_TOL)


@pytest.mark.parametrize("num_rows", [1, 5, 70])  # 70 takes the multi-threaded path
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(num_rows: int, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, 576, generator=gen) * 3
    residual = torch.randn(num_rows, 576, generator=gen) if with_residual else None
    reference, cpu = RMSNorm(576, 1e-5, "torch"), RMSNorm(576, 1e-5, "cpu")
    for norm in (reference, cpu):
        norm.weight.data = torch.randn(576, generator=torch.Generator().manual_seed(1))
    if residual is None:
        torch.testing.assert_close(cpu(x), reference(x), **TOL)
        return
    expected, expected_residual = reference(x, residual)
    res = residual.clone()
    out, new_residual = cpu(x, res)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(new_residual, expected_residual, **TOL)
    assert new_residual.data_ptr() == res.data_ptr()  # updated in place


def test_rms_norm_falls_back_to_torch_for_other_dtypes() -> None:
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(RMSNorm(64, 1e-6, "cpu")(x), RMSNorm(64, 1e-6, "torch")(x))


@pytest.mark.parametrize("num_rows", [1, 64])
def test_silu_and_mul_matches_torch(num_rows: int) -> None:
    x = torch.randn(num_rows, 2 * 1536, generator=torch.Generator().manual_seed(num_rows)) * 4
    torch.testing.assert_close(SiluAndMul("cpu")(x), SiluAndMul("torch")(x), **TOL)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8, torch.bfloat16],
                         ids=["f32", "f16", "i8", "bf16"])
@pytest.mark.parametrize("num_rows", [1, 7, 40])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 128)])
def test_rotary_and_write_kv_matches_torch_path(
    num_rows: int, num_heads: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c_calls = []
    monkeypatch.setattr(torch_backend, "rotary_write_kv",
                        lambda *args: c_calls.append(1) or layer_ops.rotary_write_kv(*args))
    gen = torch.Generator().manual_seed(num_rows * head_dim)
    block_size, num_blocks = 8, 16
    rotary = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0, "rope_type": "default"}, torch.float32,
                             torch.device("cpu"))
    positions = torch.randint(0, 512, (num_rows,), generator=gen)
    cos_sin = rotary.cos_sin(positions)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_rows]
    meta = AttentionMetadata(
        num_tokens=num_rows, block_size=block_size, query_start_loc=torch.tensor([0, num_rows]),
        seq_lens=torch.tensor([num_rows]), block_tables=torch.zeros(1, 1, dtype=torch.int64), slot_mapping=slots,
        query_lens_list=[num_rows], seq_lens_list=[num_rows],
    )
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_rows, q_size + 2 * kv_size, generator=gen)

    def views(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = t.split([q_size, kv_size, kv_size], dim=-1)
        return q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)

    shape = (num_kv_heads, num_blocks, block_size, kv_row_width(kv_dtype, head_dim))
    expected_cache = (torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype))
    # float16 / bfloat16: both round to nearest, but from float32 values that may differ in the last bit
    cache_tol = TOL if kv_dtype == torch.float32 else {"rtol": 8e-3 if kv_dtype == torch.bfloat16 else 1e-3,
                                                       "atol": 1e-5}
    q, k, v = views(qkv.clone())
    expected_q, expected_k = RotaryEmbedding.apply(cos_sin, q, k)
    TorchAttentionBackend(use_c_kernels=False).write_kv(expected_k, v, expected_cache, meta)

    for fused_layout in (True, False):  # a fused qkv projection, and separate tensors (the torch fallback)
        q, k, v = views(qkv.clone()) if fused_layout else (t.clone() for t in views(qkv))
        cache = (torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype))
        out_q, out_k, out_v = TorchAttentionBackend().rotary_and_write_kv(q, k, v, cos_sin, cache, meta)
        torch.testing.assert_close(out_q, expected_q, **TOL)
        torch.testing.assert_close(k, expected_k, **TOL)  # key is rotated in place
        torch.testing.assert_close(out_k, expected_k, **TOL)  # and returned with the value, for forward()
        torch.testing.assert_close(out_v, v, **TOL)
        if kv_dtype == torch.int8:
            # V is bitwise the same input on both paths: the same int8 rows. K may differ in its last bit after
            # the rotation: at most one step of its row's scale.
            assert torch.equal(cache[1], expected_cache[1])
            got, want = kv_values(cache[0], torch.float32), kv_values(expected_cache[0], torch.float32)
            step = want.abs().amax(dim=-1, keepdim=True) / 127
            assert bool(((got - want).abs() <= 1.01 * step + 1e-6).all())
        else:
            torch.testing.assert_close(cache[0], expected_cache[0], **cache_tol)
            torch.testing.assert_close(cache[1], expected_cache[1], **cache_tol)
        assert len(c_calls) == 1  # the fused layout took the C kernel (also for a single row), the other not


@pytest.mark.parametrize("rows, width", [(1, 49152), (3, 37), (8, 1000), (64, 4103)])
def test_rows_max_is_torch_max(rows: int, width: int) -> None:
    """rows_max (the C kernel on float32 CPU rows): torch's max(dim=-1), values and first index of the maximum, on
    random rows, rows whose maximum repeats (the first place wins), in a vector's tail or at its first lane."""
    gen = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=gen)
    x[0, width // 3] = x[0, width - 1] = 9.0  # a tie: the first one
    if rows > 1:
        x[1, width - 1] = 11.0  # past the last whole 8-lane vector where width % 8
    if rows > 2:
        x[2, 0] = x[2, 8 % width] = 12.0
    values, ids = layer_ops.rows_max(x)
    expected = x.max(dim=-1)
    assert torch.equal(ids, expected.indices) and torch.equal(values, expected.values)


def test_rows_max_leaves_non_finite_rows_to_torch() -> None:
    """A NaN or an infinity anywhere: torch's reduction for the call (NaN propagates as torch's max does)."""
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    x[1, 17] = float("nan")
    x[3, 250] = float("inf")
    x[4] = float("-inf")
    values, ids = layer_ops.rows_max(x)
    expected = x.max(dim=-1)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(values, expected.values, equal_nan=True)
    y = x[::2]  # not contiguous: torch's reduction
    assert torch.equal(layer_ops.rows_max(y)[1], y.max(dim=-1).indices)
