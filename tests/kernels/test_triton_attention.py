"""The Triton attention kernels against a float64 dense reference and the torch backend, on fresh
random paged inputs: mixed batches (decodes, whole prefills, prefills over a cached prefix, lengths
ending inside blocks), split-K decode with uneven lengths, CUDA-graph length bounds, an FP8 cache.

Runs in Triton's interpreter on the CPU (tests/kernels/conftest.py) and compiled on a GPU. Small
tiles (16) make the interpreter cover multi-tile prefills and multi-chunk decodes on short inputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.test_torch_attention import _metadata, _reference
from tokenmill.attention.backend import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.attention.triton_backend import TritonAttentionBackend
from tokenmill.kernels.triton.paged_attention import decode_attention

TILE = 16


def _on(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    return dataclasses.replace(
        meta, query_start_loc=meta.query_start_loc.to(device), seq_lens=meta.seq_lens.to(device),
        block_tables=meta.block_tables.to(device), slot_mapping=meta.slot_mapping.to(device), scratch={},
    )


def _paged_contexts(plan, num_kv_heads, head_dim, block_size, num_blocks, gen):
    """Random K/V per request and a shuffled block table for each."""
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, contexts = [], []
    for cached, new in plan:
        total = cached + new
        tables.append([free.pop() for _ in range(-(-total // block_size))])
        contexts.append((torch.randn(total, num_kv_heads, head_dim, generator=gen),
                         torch.randn(total, num_kv_heads, head_dim, generator=gen)))
    return tables, contexts


def _fill_cache(lengths, tables, contexts, shape, block_size):
    """A float32 cache holding the first lengths[i] tokens of request i (written by the torch backend)."""
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    meta = _metadata([(0, n) for n in lengths], [t or [0] for t in tables], block_size)
    TorchAttentionBackend().write_kv(torch.cat([k[:n] for n, (k, _) in zip(lengths, contexts)]),
                                     torch.cat([v[:n] for n, (_, v) in zip(lengths, contexts)]), (k_cache, v_cache), meta)
    return k_cache, v_cache


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(8, 2, 64), (4, 4, 128), (6, 2, 64)])
def test_mixed_batch_matches_reference(device, block_size, num_heads, num_kv_heads, head_dim) -> None:
    gen = torch.Generator().manual_seed(block_size * 7 + num_heads + head_dim)
    plan = [(0, 7), (13, 1), (5, 37), (0, 1), (40, 1), (22, 3), (0, 33)]
    num_blocks = 40
    tables, contexts = _paged_contexts(plan, num_kv_heads, head_dim, block_size, num_blocks, gen)
    backend = TritonAttentionBackend(decode_block_n=TILE, prefill_block_m=TILE, prefill_block_n=TILE)
    shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
    # The cached prefixes were written in earlier steps; this step's new rows go through write_kv.
    k_cache, v_cache = _fill_cache([c for c, _ in plan], tables, contexts, shape, block_size)
    kv_cache = (k_cache.to(device), v_cache.to(device))
    meta = _metadata(plan, tables, block_size)
    q = torch.randn(meta.num_tokens, num_heads, head_dim, generator=gen)
    k_new = torch.cat([k[c:] for (c, _), (k, _) in zip(plan, contexts)])
    v_new = torch.cat([v[c:] for (c, _), (_, v) in zip(plan, contexts)])
    dev_meta = _on(meta, device)
    backend.write_kv(k_new.to(device), v_new.to(device), kv_cache, dev_meta)
    scale = head_dim**-0.5
    out = backend.forward(q.to(device), None, None, kv_cache, dev_meta, scale).cpu()

    # The torch backend reading the cache the Triton kernel wrote.
    cpu_cache = (kv_cache[0].cpu(), kv_cache[1].cpu())
    torch_out = TorchAttentionBackend().forward(q, k_new, v_new, cpu_cache, meta, scale)
    torch.testing.assert_close(out, torch_out, atol=2e-5, rtol=2e-5)
    row = 0
    for (cached, new), (k, v) in zip(plan, contexts):
        expected = _reference(q[row : row + new], k, v, cached, scale)
        torch.testing.assert_close(out[row : row + new].double(), expected, atol=2e-5, rtol=2e-5)
        row += new


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_decode_uneven_lengths(device, num_splits) -> None:
    gen = torch.Generator().manual_seed(num_splits)
    lens = [1, 17, 64, 90, 33, 0]  # the 0 is a padding row of a CUDA-graph batch: output 0
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 64, 16
    plan = [(n - 1, 1) if n else (0, 0) for n in lens]
    num_blocks = sum(-(-n // block_size) for n in lens) + 1
    tables, contexts = _paged_contexts(plan, num_kv_heads, head_dim, block_size, num_blocks, gen)
    tables = [t or [0] for t in tables]
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    k_cache, v_cache = _fill_cache(lens, tables, contexts, shape, block_size)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    out = torch.full_like(q, float("nan")).to(device)
    decode_attention(q.to(device), k_cache.to(device), v_cache.to(device), block_tables.to(device),
                     torch.tensor(lens).to(device), out, 0.3, num_splits, block_n=TILE)
    out = out.cpu()
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i]))
            continue
        k, v = contexts[i]
        torch.testing.assert_close(out[i : i + 1].double(), _reference(q[i : i + 1], k, v, n - 1, 0.3),
                                   atol=2e-5, rtol=2e-5)


def test_graph_bound_sizes_split_by_bound(device) -> None:
    """With seq_len_bound set the plan ignores the host lengths (they are not valid at replay)."""
    gen = torch.Generator().manual_seed(3)
    lens = [5, 14, 12]  # one chunk each: a single split, unless sized by the bound
    plan = [(n - 1, 1) for n in lens]
    tables, contexts = _paged_contexts(plan, 2, 64, 16, 4, gen)
    k_cache, v_cache = _fill_cache(lens, tables, contexts, (2, 4, 16, 64), 16)
    meta = _on(_metadata(plan, tables, 16), device)
    bounded = dataclasses.replace(meta, seq_lens_list=[512] * 3, seq_len_bound=512, scratch={})
    q = torch.randn(3, 4, 64, generator=gen).to(device)
    backend = TritonAttentionBackend(decode_block_n=TILE)
    cache = (k_cache.to(device), v_cache.to(device))
    out = backend.forward(q, None, None, cache, bounded, 0.125)
    assert bounded.scratch["triton_plan"].num_splits > backend._plan(meta, q, cache[0]).num_splits
    torch.testing.assert_close(out, backend.forward(q, None, None, cache, meta, 0.125), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_kv_cache(device, dtype) -> None:
    """An FP8 cache (scales 0.5 / 2) gives attention over the dequantized K/V, for float32 and bf16 queries."""
    gen = torch.Generator().manual_seed(8)
    plan = [(20, 1), (0, 19), (3, 1), (30, 5)]
    tables, contexts = _paged_contexts(plan, 2, 128, 16, 16, gen)
    k_scale, v_scale = 0.5, 2.0
    k32, v32 = _fill_cache([c + n for c, n in plan], tables, contexts, (2, 16, 16, 128), 16)
    k8 = (k32 / k_scale).to(torch.float8_e4m3fn)
    v8 = (v32 / v_scale).to(torch.float8_e4m3fn)
    meta = _metadata(plan, tables, 16)
    q = torch.randn(meta.num_tokens, 8, 128, generator=gen)
    backend = TritonAttentionBackend(k_scale=k_scale, v_scale=v_scale, decode_block_n=TILE,
                                     prefill_block_m=TILE, prefill_block_n=TILE)
    out = backend.forward(q.to(device, dtype), None, None, (k8.to(device), v8.to(device)), _on(meta, device), 0.1)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    q = q.to(dtype).float()
    row = 0
    for (cached, new), (k, v) in zip(plan, contexts):
        # The reference sees exactly the values the cache holds.
        k = (k / k_scale).to(torch.float8_e4m3fn).float() * k_scale
        v = (v / v_scale).to(torch.float8_e4m3fn).float() * v_scale
        expected = _reference(q[row : row + new], k, v, cached, 0.1).float()
        torch.testing.assert_close(out[row : row + new].float().cpu(), expected, atol=tol, rtol=tol)
        row += new
