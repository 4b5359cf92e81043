"""Paged attention kernels over the head-major KV cache [num_kv_heads, num_blocks, block_size, head_dim].

decode_attention: one query row per request (flash-decoding). A program owns one (request, KV head,
    split) and all GROUP query heads sharing that KV head, so each K/V tile is read once per group.
    The context is cut into BLOCK_N-token chunks and split s takes chunks s, s + S, s + 2S, ...: with
    a fixed S every split gets an even share of any length, which is what lets a CUDA graph captured
    for a length bound replay over shorter contexts. Splits write a normalized partial output and its
    log-sum-exp; a second kernel merges them. With S == 1 the first kernel writes the output itself.
prefill_attention: several query rows per request (prefill chunks, prefill over a cached prefix).
    A program owns BLOCK_M query rows of one request and one query head, and walks the request's
    pages up to the tile's last position (causal).

Both read this step's K/V from the cache, so the cache must already hold them (write first).
Token t of a request sits in page block_tables[req, t // block_size] at offset t % block_size; any
block_size works. K/V may be stored in FP8 with per-tensor scales: k_scale folds into the softmax
scale and v_scale into the output. Softmax runs in base 2 (exp2) with log2(e) folded into qk_scale.
"""

from __future__ import annotations

import torch

from tokenmill.kernels.triton import check_device, compute_dtype, dot_precision, tl, triton

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, items_ptr,
    out_ptr, part_o_ptr, part_lse_ptr, num_splits, qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ch, stride_cb, stride_ct, stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ITEMS: tl.constexpr, SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_ITEMS:  # a mixed batch: item -> request index, its query row from query_start_loc
        req = tl.load(items_ptr + item)
        row = tl.load(query_start_loc_ptr + req)
    else:  # pure decode: request i owns query row i
        req = item
        row = item
    seq_len = tl.load(seq_lens_ptr + req)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kv_base = kv_head.to(tl.int64) * stride_ch
    table = block_tables_ptr + req * stride_bt
    num_chunks = tl.cdiv(seq_len, BLOCK_N)
    for chunk in range(split, num_chunks, num_splits):
        # Every chunk visited holds >= 1 valid token, so m_new is finite after the first one.
        offs_n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        blocks = tl.load(table + offs_n // PAGE, mask=n_ok, other=0)
        kv_off = kv_base + blocks * stride_cb + (offs_n % PAGE) * stride_ct
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    # l_i == 0 only for a split that saw no token (or a padded request of length 0): output 0.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        part = (item * tl.num_programs(1) * GROUP + heads) * num_splits + split
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_ok)
        tl.store(part_o_ptr + part[:, None] * BLOCK_D + offs_d[None, :], o, mask=g_ok[:, None])
    else:
        o = o * v_scale
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, query_start_loc_ptr, items_ptr, out_ptr, num_splits, v_scale,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_ITEMS: tl.constexpr,
):
    item = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_ITEMS:
        row = tl.load(query_start_loc_ptr + tl.load(items_ptr + item))
    else:
        row = item
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    base = (item * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (length-0 padding row): weights 0
    w = tl.exp2(lse - m)
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0) * v_scale
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    tile_req_ptr, tile_start_ptr, out_ptr, qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ch, stride_cb, stride_ct, stride_bt,
    GROUP: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    req = tl.load(tile_req_ptr + tile)
    first = tl.load(tile_start_ptr + tile)  # this tile's first query index within the request
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    # Query i of the request sits at position seq_len - q_len + i and sees keys at positions <= it;
    # every row (padding rows too) sees key 0, so no row's softmax is empty.
    q_pos = seq_len - q_len + offs_m
    end = tl.minimum(seq_len, seq_len - q_len + first + BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = (head // GROUP).to(tl.int64) * stride_ch
    table = block_tables_ptr + req * stride_bt
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        blocks = tl.load(table + offs_n // PAGE, mask=n_ok, other=0)
        kv_off = kv_base + blocks * stride_cb + (offs_n % PAGE) * stride_ct
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None] * v_scale
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _cache_strides(cache: torch.Tensor) -> tuple[int, int, int]:
    if cache.dim() != 4 or cache.stride(3) != 1:
        raise ValueError(f"KV cache must be [num_kv_heads, num_blocks, block_size, head_dim], got {tuple(cache.shape)}")
    return cache.stride(0), cache.stride(1), cache.stride(2)


def decode_num_splits(num_items: int, num_kv_heads: int, max_seq_len: int, block_n: int, num_sms: int) -> int:
    """Splits per (request, KV head): enough programs for about two waves over the multiprocessors,
    never more than the longest context has chunks, at most 64."""
    chunks = max(1, -(-max_seq_len // block_n))
    want = -(-2 * num_sms // max(1, num_items * num_kv_heads))
    return max(1, min(want, chunks, 64))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, out: torch.Tensor, scale: float, num_splits: int, *,
    items: torch.Tensor | None = None, query_start_loc: torch.Tensor | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, block_n: int = 64,
    partials: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Writes out[row] for one query row per decode item. q/out: [T, H, D] (row stride free, last dim
    contiguous). Without `items`, item i is request i at row i; with it, item i is request items[i] at
    row query_start_loc[items[i]]. `partials` ([n, H, S, BLOCK_D] and [n, H, S] float32) may be passed
    to reuse buffers across layers."""
    check_device(q)
    num_items = block_tables.shape[0] if items is None else items.shape[0]
    if num_items == 0:
        return
    num_kv_heads, _, page, head_dim = k_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    stride_ch, stride_cb, stride_ct = _cache_strides(k_cache)
    split = num_splits > 1
    if split and partials is None:
        partials = decode_partials(num_items, num_heads, num_splits, head_dim, q.device)
    part_o, part_lse = partials if split else (out, out)
    has_items = items is not None
    items_arg = items if has_items else seq_lens
    qsl = query_start_loc if query_start_loc is not None else seq_lens
    _decode_kernel[(num_items, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, qsl, items_arg, out, part_o, part_lse,
        num_splits, scale * k_scale * _LOG2E, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), stride_ch, stride_cb, stride_ct,
        block_tables.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), PAGE=page, BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_ITEMS=has_items, SPLIT=split,
        DOT_DTYPE=compute_dtype(q.dtype), PRECISION=dot_precision(q.dtype), num_warps=4, num_stages=2,
    )
    if split:
        _decode_reduce_kernel[(num_items, num_heads)](
            part_o, part_lse, qsl, items_arg, out, num_splits, v_scale, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            HAS_ITEMS=has_items, num_warps=4,
        )


def decode_partials(num_items: int, num_heads: int, num_splits: int, head_dim: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    block_d = triton.next_power_of_2(head_dim)
    return (torch.empty(num_items, num_heads, num_splits, block_d, dtype=torch.float32, device=device),
            torch.empty(num_items, num_heads, num_splits, dtype=torch.float32, device=device))


def prefill_tiles(query_lens: list[int], reqs: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """(request index, first query index) of every BLOCK_M-row tile of the given requests."""
    tile_req: list[int] = []
    tile_start: list[int] = []
    for r in reqs:
        for first in range(0, query_lens[r], block_m):
            tile_req.append(r)
            tile_start.append(first)
    return tile_req, tile_start


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, tile_req: torch.Tensor, tile_start: torch.Tensor,
    out: torch.Tensor, scale: float, *, k_scale: float = 1.0, v_scale: float = 1.0,
    block_m: int = 64, block_n: int = 64,
) -> None:
    """Causal attention for the query rows covered by the tiles (see prefill_tiles, same block_m)."""
    check_device(q)
    if tile_req.numel() == 0:
        return
    num_kv_heads, _, page, head_dim = k_cache.shape
    num_heads = q.shape[1]
    stride_ch, stride_cb, stride_ct = _cache_strides(k_cache)
    _prefill_kernel[(tile_req.numel(), num_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tile_req, tile_start, out,
        scale * k_scale * _LOG2E, v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), stride_ch, stride_cb, stride_ct,
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), DOT_DTYPE=compute_dtype(q.dtype),
        PRECISION=dot_precision(q.dtype), num_warps=8 if q.dtype == torch.float32 else 4, num_stages=2,
    )


def num_multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few, so tests exercise split decoding


__all__ = [
    "decode_attention", "decode_num_splits", "decode_partials", "num_multiprocessors", "prefill_attention",
    "prefill_tiles",
]
