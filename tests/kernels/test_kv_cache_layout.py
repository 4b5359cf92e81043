"""The bfloat16 K/V cache's pair-interleaved tiles (kernels/cpu/kv_cache.py and kv_cache.h): where the torch writer
puts each value, that the reader gives the rows back, and that the block size and head size must be even."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.cpu.kv_cache import check_bf16_tiles, kv_type_code, tiles_as_rows, write_kv_rows
from tokenmill.worker.device import resolve_kv_cache_dtype


def test_bf16_tiles_interleave_pairs_as_the_dot_products_read_them() -> None:
    block_size, head_dim = 4, 6
    cache = torch.zeros(1, 2, block_size, head_dim, dtype=torch.bfloat16)
    values = (torch.arange(block_size * head_dim, dtype=torch.float32) + 1).view(1, block_size, head_dim)  # exact
    slots = torch.arange(block_size, 2 * block_size)  # the second block
    write_kv_rows(cache, slots, values, is_value=False)
    k_tile = cache[0, 1].reshape(-1)
    # K: [head_dim / 2][block_size][2]: position j's dims (2i, 2i + 1) at ((i * block_size) + j) * 2.
    for j in range(block_size):
        for d in range(head_dim):
            assert k_tile[((d // 2) * block_size + j) * 2 + d % 2] == values[0, j, d]
    assert not cache[0, 0].any()  # the first block untouched
    write_kv_rows(cache, slots, values, is_value=True)
    v_tile = cache[0, 1].reshape(-1)
    # V: [block_size / 2][head_dim][2]: positions (2p, 2p + 1) of dim d at ((p * head_dim) + d) * 2.
    for j in range(block_size):
        for d in range(head_dim):
            assert v_tile[((j // 2) * head_dim + d) * 2 + j % 2] == values[0, j, d]


@pytest.mark.parametrize("is_value", [False, True])
def test_tiles_as_rows_inverts_the_writer(is_value: bool) -> None:
    gen = torch.Generator().manual_seed(int(is_value))
    num_kv_heads, num_blocks, block_size, head_dim = 3, 5, 8, 16
    cache = torch.zeros(num_kv_heads, num_blocks, block_size, head_dim, dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:29]
    rows = torch.randn(num_kv_heads, len(slots), head_dim, generator=gen)
    write_kv_rows(cache, slots, rows, is_value)
    as_rows = tiles_as_rows(cache, is_value).view(num_kv_heads, -1, head_dim)
    assert torch.equal(as_rows[:, slots], rows.to(torch.bfloat16))
    other = torch.ones(num_blocks * block_size, dtype=torch.bool)
    other[slots] = False
    assert not as_rows[:, other].any()


def test_odd_blocks_or_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="must be even"):
        check_bf16_tiles(5, 64)
    with pytest.raises(ValueError, match="must be even"):
        kv_type_code((torch.zeros(1, 2, 4, 7, dtype=torch.bfloat16),) * 2)
    with pytest.raises(ValueError, match="must be even"):
        resolve_kv_cache_dtype("bfloat16", torch.bfloat16, "torch", block_size=5)
    assert resolve_kv_cache_dtype("bfloat16", torch.float32, "torch", block_size=4) == torch.bfloat16
    # auto: a bfloat16 model's cache is bfloat16 only where the kernels multiply its tiles as they lie
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, "torch", block_size=5) == torch.float16
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, "triton") == torch.bfloat16
