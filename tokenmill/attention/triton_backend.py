"""Attention over the paged KV cache with Triton kernels (the GPU backend).

Same head-major cache layout as the torch backend, [num_kv_heads, num_blocks, block_size, head_dim],
so the two read each other's caches (tests compare them on one cache). The cache may be FP8 (e4m3)
with per-tensor scales k_scale / v_scale (1.0 by default: e4m3 covers +-448, far beyond the K/V
values of RMS-normed Llama-family layers).

Per step (shared by all layers through meta.scratch) the backend plans:
  * decode items: requests with one query row, run by the split-K decode kernel. In a pure-decode
    batch they are all requests, in order, and nothing is read from host lists but the count and
    the length bound, so the step can be captured in a CUDA graph (meta.seq_len_bound set);
  * prefill tiles: BLOCK_M-row tiles of the requests with several query rows.
Rotary embedding and the K/V write are fused into one kernel (rotary_and_write_kv), which model code
reaches through Attention when `fuses_rotary` is true.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.kernels.triton.paged_attention import (
    decode_attention,
    decode_num_splits,
    decode_partials,
    num_multiprocessors,
    prefill_attention,
    prefill_tiles,
)
from tokenmill.kernels.triton.rope_kv import rope_and_write_kv


@dataclass
class _StepPlan:
    decode_items: torch.Tensor | None  # request indices of decode rows; None = all requests, in order
    num_decode: int
    num_splits: int
    partials: tuple[torch.Tensor, torch.Tensor] | None  # split-K scratch, reused by every layer
    tile_req: torch.Tensor | None  # prefill tiles (None when there are none)
    tile_start: torch.Tensor | None


class TritonAttentionBackend:
    name = "triton"
    fuses_rotary = True
    use_c_kernels = False  # the GPU path: the layers take their Triton kernels

    def __init__(self, k_scale: float = 1.0, v_scale: float = 1.0, decode_block_n: int = 64,
                 prefill_block_m: int = 64, prefill_block_n: int = 64) -> None:
        self.k_scale = k_scale
        self.v_scale = v_scale
        self.decode_block_n = decode_block_n
        self.prefill_block_m = prefill_block_m
        self.prefill_block_n = prefill_block_n
        self._num_sms: int | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype | None = None) -> tuple[int, ...]:
        return (num_kv_heads, num_blocks, block_size, head_dim)  # every dtype it takes stores head_dim elements

    def _scales(self, cache: torch.Tensor) -> tuple[float, float]:
        return (self.k_scale, self.v_scale) if cache.dtype == torch.float8_e4m3fn else (1.0, 1.0)

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> None:
        rope_and_write_kv(None, key, value, None, None, meta.slot_mapping, *kv_cache, *self._scales(kv_cache[0]))

    def rotary_and_write_kv(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotates query in place and writes rotated key and value into the cache; returns query and the
        (un-rotated) key and value, which forward() does not read."""
        cos, sin = cos_sin
        rope_and_write_kv(query, key, value, cos, sin, meta.slot_mapping, *kv_cache, *self._scales(kv_cache[0]))
        return query, key, value

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float,
    ) -> torch.Tensor:
        """Reads every key/value from the cache (written before this call); key/value are unused."""
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        plan = self._plan(meta, query, kv_cache[0])
        k_scale, v_scale = self._scales(kv_cache[0])
        if plan.num_decode:
            decode_attention(
                query, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, out, scale, plan.num_splits,
                items=plan.decode_items, query_start_loc=meta.query_start_loc, k_scale=k_scale, v_scale=v_scale,
                block_n=self.decode_block_n, partials=plan.partials,
            )
        if plan.tile_req is not None:
            block_m, block_n = self._prefill_blocks(query.dtype)
            prefill_attention(
                query, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, meta.query_start_loc,
                plan.tile_req, plan.tile_start, out, scale, k_scale=k_scale, v_scale=v_scale,
                block_m=block_m, block_n=block_n,
            )
        return out

    def _prefill_blocks(self, dtype: torch.dtype) -> tuple[int, int]:
        # float32 tiles of 64 x 64 spill registers (seen in tests/kernels/aot_compile.py's sm_90 build).
        if dtype == torch.float32:
            return min(self.prefill_block_m, 32), min(self.prefill_block_n, 32)
        return self.prefill_block_m, self.prefill_block_n

    def _plan(self, meta: AttentionMetadata, query: torch.Tensor, k_cache: torch.Tensor) -> _StepPlan:
        plan = meta.scratch.get("triton_plan")
        if plan is not None:
            return plan
        device = query.device
        if self._num_sms is None:
            self._num_sms = num_multiprocessors(device)
        num_kv_heads, head_dim = k_cache.shape[0], k_cache.shape[3]
        if meta.is_pure_decode:
            decode_reqs, prefill_reqs, items = list(range(meta.num_reqs)), [], None
        else:
            decode_reqs = [i for i, q in enumerate(meta.query_lens_list) if q == 1]
            prefill_reqs = [i for i, q in enumerate(meta.query_lens_list) if q > 1]
            items = torch.tensor(decode_reqs, dtype=torch.int64, device=device) if decode_reqs else None
        # A captured graph replays with other lengths: size the split by the bound, never by the lists.
        if meta.seq_len_bound is not None:
            max_len = meta.seq_len_bound
        else:
            max_len = max((meta.seq_lens_list[i] for i in decode_reqs), default=1)
        num_splits = decode_num_splits(len(decode_reqs), num_kv_heads, max_len, self.decode_block_n, self._num_sms)
        partials = None
        if decode_reqs and num_splits > 1:
            partials = decode_partials(len(decode_reqs), query.shape[1], num_splits, head_dim, device)
        tile_req = tile_start = None
        if prefill_reqs:
            reqs, starts = prefill_tiles(meta.query_lens_list, prefill_reqs, self._prefill_blocks(query.dtype)[0])
            tiles = torch.tensor([reqs, starts], dtype=torch.int64).to(device)
            tile_req, tile_start = tiles[0], tiles[1]
        plan = _StepPlan(items, len(decode_reqs), num_splits, partials, tile_req, tile_start)
        meta.scratch["triton_plan"] = plan
        return plan
