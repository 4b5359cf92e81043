"""The torch attention backend against a float64 dense reference on random paged inputs, with the C
kernels (use_c_kernels=True, the CPU default) and without it (the pure torch reference), over float32
float16 and int8 K/V caches (the reference then reads K/V rounded to float16, or quantized to int8 rows, wherever
the backend reads them back from the cache)."""

from __future__ import annotations

import shutil

import pytest
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import (
    BF16_KERNEL,
    C_PREFILL_KERNEL,
    SDPA_KERNEL,
    TorchAttentionBackend,
    max_rows_routed,
    route_kernel,
)
from tokenmill.kernels.cpu.bf16_prompt_attention import bf16_prompt_attention_available
from tokenmill.kernels.cpu.kv_cache import kv_values, quantize_kv_rows
from tokenmill.kernels.cpu.paged_attention import bf16_cache_products


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """Dense causal attention in float64; q rows sit at positions q_start.. of the k/v context."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    q_pos = torch.arange(q_start, q_start + q.shape[0]).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(k.shape[0]).unsqueeze(0) > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_c_kernels_are_built_where_a_compiler_exists() -> None:
    assert TorchAttentionBackend().use_c_kernels


# (cached prefix length, new tokens): decodes, whole prefills, and prefills over a cached prefix,
# with lengths that end inside blocks; the long ones span several of the C kernel's 16-row query
# blocks and 16-position chunks.
SHORT_PLAN = [(0, 7), (13, 1), (5, 9), (0, 1), (31, 1), (22, 3)]
LONG_PLAN = [(0, 70), (45, 38), (0, 1), (3, 17)]


KV_DTYPES = pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8, torch.bfloat16],
                                    ids=["f32", "f16", "i8", "bf16"])


def _tolerance(kv_dtype: torch.dtype, native: bool, block_size: int, head_dim: int) -> float:
    """The decode kernel's bf16 products round queries and probabilities to bf16 too (their sums stay float32);
    every other path reads the cached values in float32."""
    return 1e-2 if kv_dtype == torch.bfloat16 and native and bf16_cache_products(block_size, head_dim) else 1e-5


def _as_cached(t: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    """What reading t back from a kv_dtype cache gives."""
    if kv_dtype == torch.int8:
        return kv_values(quantize_kv_rows(t), torch.float32)
    return t.to(kv_dtype).float()


def _attend(
    backend: TorchAttentionBackend, plan: list[tuple[int, int]], block_size: int, num_heads: int, num_kv_heads: int,
    head_dim: int, kv_dtype: torch.dtype, scale: float, gen: torch.Generator,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One step of `plan` ((cached prefix, new tokens) per request) through backend over random paged K/V, each
    request's cached prefix written first as by earlier steps; returns the queries, every request's whole (K, V)
    context and the attention output."""
    num_blocks = 64
    shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype)
    kv_cache = (torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, contexts = [], []
    for cached, new in plan:
        total = cached + new
        blocks = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(blocks)
        k = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        contexts.append((k, v))
        if cached:  # the prefix is already in the cache from earlier steps
            backend.write_kv(k[:cached], v[:cached], kv_cache, _metadata([(0, cached)], [blocks], block_size))
    meta = _metadata(plan, tables, block_size)
    q = torch.randn(meta.num_tokens, num_heads, head_dim, generator=gen)
    k_new = torch.cat([k[c:] for (c, _), (k, _) in zip(plan, contexts)])
    v_new = torch.cat([v[c:] for (c, _), (_, v) in zip(plan, contexts)])
    backend.write_kv(k_new, v_new, kv_cache, meta)
    return q, contexts, backend.forward(q, k_new, v_new, kv_cache, meta, scale)


@pytest.mark.skipif(not bf16_prompt_attention_available(64), reason="no AMX-BF16 or AVX512-BF16 here")
def test_prompts_past_the_amx_kernels_longest_go_to_the_c_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-context prompt routed to BF16_KERNEL but longer than it takes (AMX_ATTENTION_MAX_KEYS, here cut to 32)
    attends in the C prefill kernel over the cache, in float32; shorter ones stay on the bf16 kernel."""
    from tokenmill.attention import torch_backend

    monkeypatch.setattr(torch_backend, "AMX_ATTENTION_MAX_KEYS", 32)
    plan = [(0, 40), (0, 20)]
    block_size, num_heads, num_kv_heads, head_dim, kv_dtype = 8, 9, 3, 64, torch.float16
    backend = TorchAttentionBackend()
    backend.route_prompt_attention([(2048, BF16_KERNEL)], torch.bfloat16)
    q, contexts, out = _attend(backend, plan, block_size, num_heads, num_kv_heads, head_dim, kv_dtype,
                               head_dim**-0.5, torch.Generator().manual_seed(2))
    (k40, v40), (k20, v20) = contexts
    exact = _reference(q[:40], _as_cached(k40, kv_dtype), _as_cached(v40, kv_dtype), 0, head_dim**-0.5)
    torch.testing.assert_close(out[:40].double(), exact, atol=1e-5, rtol=1e-5)  # the C kernel, float32
    rounded = _reference(*(t.to(torch.bfloat16).float() for t in (q[40:], k20, v20)), 0, head_dim**-0.5)
    torch.testing.assert_close(out[40:].double(), rounded, atol=3e-2, rtol=3e-2)  # AMX, bf16


@KV_DTYPES
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim",
                         [(4, 4, 16), (9, 3, 64), (8, 2, 32), (6, 3, 40), (4, 1, 12)])
@pytest.mark.parametrize("plan", [SHORT_PLAN, LONG_PLAN], ids=["short", "long"])
def test_mixed_batch_matches_reference(
    native: bool, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int, plan: list[tuple[int, int]],
    kv_dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(block_size * 100 + num_heads)
    backend = TorchAttentionBackend(use_c_kernels=native)
    scale = head_dim**-0.5
    q, contexts, out = _attend(backend, plan, block_size, num_heads, num_kv_heads, head_dim, kv_dtype, scale, gen)
    row = 0
    uses_c = native and head_dim % 8 == 0
    for (cached, new), (k, v) in zip(plan, contexts):
        # The torch path attends a whole new prompt with this step's K/V; every other path reads the cache.
        if uses_c or cached or new == 1:
            k, v = _as_cached(k, kv_dtype), _as_cached(v, kv_dtype)
        expected = _reference(q[row : row + new], k, v, cached, scale)
        tol = _tolerance(kv_dtype, native, block_size, head_dim)
        torch.testing.assert_close(out[row : row + new].double(), expected, atol=tol, rtol=tol)
        row += new


# The plan's routes by prompt length: torch's fused attention up to 16 rows, C up to 64, torch beyond.
ROUTES = [(16, SDPA_KERNEL), (64, C_PREFILL_KERNEL), (2048, SDPA_KERNEL)]


def test_route_kernel_takes_the_first_bound_that_holds() -> None:
    assert [route_kernel(ROUTES, n) for n in (2, 16, 17, 64, 65, 5000)] == [
        SDPA_KERNEL, SDPA_KERNEL, C_PREFILL_KERNEL, C_PREFILL_KERNEL, SDPA_KERNEL, SDPA_KERNEL]
    assert route_kernel([], 100) == C_PREFILL_KERNEL
    with pytest.raises(ValueError, match="unknown prompt attention kernels"):
        TorchAttentionBackend().route_prompt_attention([(16, "magic")], torch.float32)
    with pytest.raises(ValueError, match="for a bf16 or an int8/int4 model"):
        TorchAttentionBackend().route_prompt_attention([(16, BF16_KERNEL)], torch.float32)
    quantized = TorchAttentionBackend()  # float32 activations of int8/int4 projections may attend in bf16
    quantized.route_prompt_attention([(16, BF16_KERNEL)], torch.float32, quantized=True)
    assert quantized.prompt_routes == [(16, BF16_KERNEL)]


# With our bf16 kernel (a bf16 model's candidate where the CPU has AMX-BF16 or AVX512-BF16): up to 16 rows and from 65.
AMX_ROUTES = [(16, BF16_KERNEL), (64, C_PREFILL_KERNEL), (2048, BF16_KERNEL)]


def test_max_rows_routed_is_the_leading_run_of_one_kernel() -> None:
    assert max_rows_routed(AMX_ROUTES, BF16_KERNEL, 8192) == 16
    assert max_rows_routed([(256, BF16_KERNEL), (2048, BF16_KERNEL)], BF16_KERNEL, 8192) == 8192
    assert max_rows_routed([(256, BF16_KERNEL), (2048, SDPA_KERNEL)], BF16_KERNEL, 8192) == 256
    assert max_rows_routed(ROUTES, BF16_KERNEL, 8192) == 0
    assert max_rows_routed([], BF16_KERNEL, 8192) == 0


_AMX = pytest.mark.skipif(not bf16_prompt_attention_available(64), reason="no AMX-BF16 or AVX512-BF16 here")


@pytest.mark.skipif(not TorchAttentionBackend().use_c_prefill, reason="no C prefill kernel here")
@pytest.mark.parametrize("routes, sdpa_dtype, tol", [
    (ROUTES, torch.float32, 1e-5), (ROUTES, torch.bfloat16, 3e-2),
    pytest.param(AMX_ROUTES, torch.bfloat16, 3e-2, marks=_AMX)], ids=["f32", "bf16", "amx"])
def test_whole_prompts_follow_the_plan_routes(routes: list[tuple[int, str]], sdpa_dtype: torch.dtype,
                                              tol: float) -> None:
    """Whole-context prompts go where the routes send them (torch's fused attention and the AMX kernel read this
    step's own K/V, in bf16 for a bf16 model; adjacent prompts of one length in one batched SDPA call, every AMX
    prompt in one call); prompts over a cached prefix and decode rows stay on the C kernels; one batch."""
    plan = [(0, 7), (0, 5), (0, 5), (0, 70), (0, 70), (0, 1), (45, 38), (0, 40), (3, 17), (9, 1)]
    block_size, num_heads, num_kv_heads, head_dim, kv_dtype = 8, 9, 3, 64, torch.float16
    gen = torch.Generator().manual_seed(5)
    backend = TorchAttentionBackend()
    backend.route_prompt_attention(routes, sdpa_dtype)
    q, contexts, out = _attend(backend, plan, block_size, num_heads, num_kv_heads, head_dim, kv_dtype,
                               head_dim**-0.5, gen)
    row = 0
    for (cached, new), (k, v) in zip(plan, contexts):
        own_rows = cached == 0 and new > 1 and route_kernel(routes, new) in (SDPA_KERNEL, BF16_KERNEL)
        if own_rows:  # the step's own K/V, in the model's dtype
            qr, k, v = (t.to(sdpa_dtype).float() for t in (q[row : row + new], k, v))
            atol = tol
        else:  # read back from the float16 cache by the C kernels, in float32
            qr, k, v = q[row : row + new], _as_cached(k, kv_dtype), _as_cached(v, kv_dtype)
            atol = 1e-5
        expected = _reference(qr, k, v, cached, head_dim**-0.5)
        torch.testing.assert_close(out[row : row + new].double(), expected, atol=atol, rtol=atol)
        row += new


@KV_DTYPES
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("lens, block_size, num_heads, num_kv_heads, head_dim", [
    ([1, 8, 9, 40, 17], 8, 6, 2, 32),
    ([3, 25, 1, 16, 9, 33, 2, 8, 17, 40, 5, 12, 7, 30, 1, 24, 15, 9, 11], 8, 6, 2, 32),
    ([700, 1, 333, 64, 129], 16, 8, 2, 128),  # many blocks per request, Llama-8B head shape
    # the default model's heads: on AMX with a bfloat16 cache, the tiles (bf16_decode_amx.h), whose last block
    # of each request is partial here (a copy with zeros past the end), in blocks of 16 and of 32
    ([1, 17, 46, 320, 33, 2], 16, 9, 3, 64),
    ([1, 17, 46, 320, 33, 2], 32, 9, 3, 64),
])
def test_pure_decode_batch_matches_reference(
    native: bool, lens: list[int], block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
    kv_dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(len(lens))
    backend = TorchAttentionBackend(use_c_kernels=native)
    num_blocks = sum(-(-n // block_size) for n in lens)
    shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim, kv_dtype)
    # The C kernels never let what lies past a request's end reach its output: NaN there for the bf16 tiles, which
    # read whole blocks
    stale = float("nan") if kv_dtype == torch.bfloat16 and native else 0.0
    kv_cache = (torch.full(shape, stale, dtype=kv_dtype), torch.full(shape, stale, dtype=kv_dtype))
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    contexts = [(torch.randn(n, num_kv_heads, head_dim, generator=gen),
                 torch.randn(n, num_kv_heads, head_dim, generator=gen)) for n in lens]
    backend.write_kv(torch.cat([k for k, _ in contexts]), torch.cat([v for _, v in contexts]), kv_cache,
                     _metadata([(0, n) for n in lens], tables, block_size))
    meta = _metadata([(n - 1, 1) for n in lens], tables, block_size)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    k_last = torch.stack([k[-1] for k, _ in contexts])
    v_last = torch.stack([v[-1] for _, v in contexts])
    out = backend.forward(q, k_last, v_last, kv_cache, meta, 0.2)
    for i, (k, v) in enumerate(contexts):
        expected = _reference(q[i : i + 1], _as_cached(k, kv_dtype), _as_cached(v, kv_dtype), lens[i] - 1, 0.2)
        tol = _tolerance(kv_dtype, native, block_size, head_dim)
        torch.testing.assert_close(out[i : i + 1].double(), expected, atol=tol, rtol=tol)


def _metadata(plan: list[tuple[int, int]], tables: list[list[int]], block_size: int) -> AttentionMetadata:
    query_lens = [new for _, new in plan]
    seq_lens = [cached + new for cached, new in plan]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    slots = [
        tables[i][pos // block_size] * block_size + pos % block_size
        for i, (cached, new) in enumerate(plan) for pos in range(cached, cached + new)
    ]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return AttentionMetadata(
        num_tokens=sum(query_lens), block_size=block_size,
        query_start_loc=torch.tensor(starts), seq_lens=torch.tensor(seq_lens), block_tables=block_tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64), query_lens_list=query_lens, seq_lens_list=seq_lens,
    )
