"""Causal attention of whole-context prompts in bf16 (AMX tiles, else vdpbf16ps: kernels/cpu/bf16_prompt_attention.c,
bf16_attention_amx.h) against a float64 reference over the same bf16-rounded q/k/v."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu.bf16_prompt_attention import bf16_prompt_attention, bf16_prompt_attention_available

pytestmark = pytest.mark.skipif(not bf16_prompt_attention_available(64),
                                reason="no AMX-BF16 or AVX512-BF16 here (or no compiler)")


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T scale) v in float64 over bf16-rounded inputs; q [T, H, D], k/v [T, Hkv, D]."""
    q, k, v = (t.to(torch.bfloat16).double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    mask = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v)


@pytest.mark.parametrize("lens, heads, kv_heads, dim", [
    ([1], 9, 3, 64), ([5, 16, 17], 9, 3, 64), ([100, 1, 33], 9, 3, 64), ([300], 9, 3, 64),
    ([40, 77], 4, 2, 128),  # a Llama-8B head shape: 128 dims, four 32-input blocks
    ([50], 2, 2, 32),  # no grouping, one input block
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(lens: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    """Every prompt of a step (rows back to back, q/k/v views of one fused row as the projection writes them)
    matches the reference within the bf16 rounding of the probabilities and the output; rows outside the listed
    prompts are left alone."""
    gen = torch.Generator().manual_seed(len(lens) + dim)
    total = sum(lens) + 3  # three rows that belong to no listed prompt
    width = (heads + 2 * kv_heads) * dim
    qkv = (torch.randn(total, width, generator=gen) * 2).to(dtype)
    q = qkv[:, : heads * dim].view(total, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(total, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(total, kv_heads, dim)
    starts = [3 + sum(lens[:i]) for i in range(len(lens))]
    out = torch.full((total, heads, dim), 7.0, dtype=dtype)
    bf16_prompt_attention(out, q, k, v, starts, lens, dim**-0.5)
    assert bool((out[:3] == 7.0).all())
    for start, n in zip(starts, lens, strict=True):
        rows = slice(start, start + n)
        expected = _reference(q[rows], k[rows], v[rows], dim**-0.5)
        torch.testing.assert_close(out[rows].double(), expected, atol=2e-2, rtol=2e-2)


def test_bad_inputs_are_value_errors() -> None:
    q = torch.zeros(8, 4, 64, dtype=torch.bfloat16)
    kv = torch.zeros(8, 2, 64, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="outside the step"):
        bf16_prompt_attention(out, q, kv, kv, [4], [5], 0.125)
    with pytest.raises(ValueError, match="must be torch.bfloat16"):
        bf16_prompt_attention(out, q, kv.float(), kv, [0], [8], 0.125)
    with pytest.raises(ValueError, match="not supported"):  # head_dim not a multiple of 32
        q48, kv48 = torch.zeros(8, 4, 48, dtype=torch.bfloat16), torch.zeros(8, 2, 48, dtype=torch.bfloat16)
        bf16_prompt_attention(torch.empty_like(q48), q48, kv48, kv48, [0], [8], 0.125)
