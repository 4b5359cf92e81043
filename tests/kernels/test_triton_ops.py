"""Fused rotary + KV write, fused add + RMSNorm and the FP8-weight GEMM against their torch references
(interpreted on the CPU, compiled on a GPU; bf16 and FP8 stores are checked tightly only on a GPU,
since the interpreter truncates downcasts instead of rounding)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import HAS_CUDA
from tests.kernels.test_torch_attention import _metadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.attention.triton_backend import TritonAttentionBackend
from tokenmill.kernels.triton.fp8_gemm import w8a16_gemm
from tokenmill.kernels.triton.rmsnorm import rms_norm
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.quant.fp8 import dequantize_weight, quantize_weight


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", [(8, 2, 64, 16), (4, 4, 128, 32), (6, 3, 64, 32)])
def test_rope_and_kv_write_match_torch(device, num_heads, num_kv_heads, head_dim, block_size) -> None:
    gen = torch.Generator().manual_seed(num_heads * head_dim)
    plan = [(0, 5), (20, 1), (3, 9)]
    tables = [[3], [1, 4], [0]]
    meta = _metadata(plan, tables, block_size)
    num_tokens = meta.num_tokens
    positions = torch.cat([torch.arange(c, c + n) for c, n in plan])
    rotary = RotaryEmbedding(head_dim, 64, {"rope_theta": 10000.0, "rope_type": "default"}, torch.float32,
                             torch.device("cpu"))
    cos, sin = rotary.cos_sin(positions)
    # q, k, v as strided views of one fused projection, the way the model produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    q_ref, k_ref = RotaryEmbedding.apply((cos, sin), q, k)
    shape = (num_kv_heads, 6, block_size, head_dim)
    ref_cache = (torch.zeros(shape), torch.zeros(shape))
    TorchAttentionBackend().write_kv(k_ref, v.contiguous(), ref_cache, meta)

    qkv_dev = qkv.to(device)
    q_d, k_d, v_d = qkv_dev.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q_d, k_d, v_d = (t.view(num_tokens, -1, head_dim) for t in (q_d, k_d, v_d))
    cache = (torch.full(shape, 7.0, device=device), torch.full(shape, 7.0, device=device))
    slots = meta.slot_mapping.clone()
    skipped_slot = int(slots[1])
    slots[1] = -1  # a padding row: writes nothing
    meta.slot_mapping = slots.to(device)
    out_q, _, _ = TritonAttentionBackend().rotary_and_write_kv(q_d, k_d, v_d, (cos.to(device), sin.to(device)), cache, meta)
    assert out_q.data_ptr() == q_d.data_ptr()  # rotated in place
    torch.testing.assert_close(out_q.cpu(), q_ref, atol=1e-6, rtol=1e-6)
    flat_ref = [c.view(num_kv_heads, -1, head_dim) for c in ref_cache]
    flat = [c.cpu().view(num_kv_heads, -1, head_dim) for c in cache]
    for ours, ref in zip(flat, flat_ref):
        written = slots[slots >= 0]
        torch.testing.assert_close(ours[:, written], ref[:, written], atol=1e-6, rtol=1e-6)
        assert torch.all(ours[:, skipped_slot] == 7.0)  # the padding row wrote nothing
        untouched = torch.ones(ours.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert torch.all(ours[:, untouched] == 7.0)


@pytest.mark.skipif(not HAS_CUDA, reason="FP8 stores round correctly only when compiled (GPU)")
def test_kv_write_fp8_matches_torch_cast(device) -> None:
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(9, 2, 128, generator=gen) * 20
    v = torch.randn(9, 2, 128, generator=gen)
    shape = (2, 4, 16, 128)
    cache = (torch.zeros(shape, device=device, dtype=torch.float8_e4m3fn),
             torch.zeros(shape, device=device, dtype=torch.float8_e4m3fn))
    meta = _metadata([(0, 9)], [[2]], 16)
    meta.slot_mapping = meta.slot_mapping.to(device)
    TritonAttentionBackend(k_scale=0.25, v_scale=1.0).write_kv(k.to(device), v.to(device), cache, meta)
    ref_k = (k / 0.25).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    got_k = cache[0].float().cpu().view(2, -1, 128)[:, 32:41].transpose(0, 1)
    torch.testing.assert_close(got_k, ref_k, atol=0, rtol=0.07)  # at most one FP8 step apart
    got_v = cache[1].float().cpu().view(2, -1, 128)[:, 32:41].transpose(0, 1)
    torch.testing.assert_close(got_v, v.to(torch.float8_e4m3fn).float(), atol=0, rtol=0.07)


@pytest.mark.parametrize("hidden", [64, 100, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch(device, hidden, dtype) -> None:
    if hidden == 4096 and not HAS_CUDA and dtype == torch.bfloat16:
        pytest.skip("one wide row shape is enough in the interpreter")
    gen = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(7, hidden, generator=gen).to(dtype)
    residual = torch.randn(7, hidden, generator=gen).to(dtype)
    exact = dtype == torch.float32 or HAS_CUDA  # the interpreter truncates bf16 stores
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1.6e-2 if exact else 3e-2, rtol=1.6e-2)

    out = rms_norm(x.to(device), norm.weight.to(device), 1e-6)
    torch.testing.assert_close(out.cpu(), norm(x), **tol)
    res_dev = residual.clone().to(device)
    out = rms_norm(x.to(device), norm.weight.to(device), 1e-6, residual=res_dev)  # res_dev += x in place
    ref_out, ref_res = norm(x, residual)
    torch.testing.assert_close(res_dev.cpu(), ref_res, **tol)
    torch.testing.assert_close(out.cpu(), ref_out, **tol)


@pytest.mark.parametrize("m, n, k, split_k", [(1, 96, 256, 1), (5, 64, 1000, 3), (16, 200, 512, 2), (3, 64, 384, None)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_w8a16_gemm_matches_dequantized(device, m, n, k, split_k, per_channel) -> None:
    gen = torch.Generator().manual_seed(m * n + k)
    weight = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 1.0, n).unsqueeze(1)
    q, scale = quantize_weight(weight, per_channel)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    expected = x.double() @ dequantize_weight(q, scale).double().t() + bias.double()
    dtypes = [torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])
    for dtype in dtypes:
        out = w8a16_gemm(x.to(device, dtype), q.to(device), scale.to(device), bias.to(device, dtype),
                         block_n=32, block_k=64, split_k=split_k)
        assert out.dtype == dtype and out.shape == (m, n)
        rel = (out.double().cpu() - expected).norm() / expected.norm()
        assert rel < (1e-6 if dtype == torch.float32 else 1e-2), (dtype, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(device, dtype) -> None:
    from tokenmill.kernels.triton.activation import silu_and_mul
    from tokenmill.layers.activation import SiluAndMul

    x = (torch.randn(5, 2 * 3000, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    exact = dtype == torch.float32 or HAS_CUDA  # the interpreter truncates bf16 stores
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2 if exact else 3e-2)
    torch.testing.assert_close(silu_and_mul(x.to(device)).cpu(), SiluAndMul()(x), **tol)


def test_quantize_rows_fp8_matches_torch(device) -> None:
    from tokenmill.kernels.triton.fp8_gemm import quantize_rows_fp8
    from tokenmill.quant.fp8 import quantize_per_token

    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(2)) * torch.tensor([1e-3, 1, 10, 100, 0]).unsqueeze(1)
    q, scale = quantize_rows_fp8(x.to(device))
    q_ref, scale_ref = quantize_per_token(x)
    torch.testing.assert_close(scale.cpu(), scale_ref)
    if HAS_CUDA:  # FP8 stores round correctly only when compiled
        torch.testing.assert_close(q.float().cpu(), q_ref.float(), atol=0, rtol=0)
