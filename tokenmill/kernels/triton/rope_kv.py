"""Fused rotary embedding + paged KV-cache write: one pass over this step's q, k and v.

Per token t: q[t] is rotated in place, k[t] rotated and v[t] copied into the cache slot
slot_mapping[t] (K/V cache layout [num_kv_heads, num_blocks * block_size, head_dim] when viewed flat
over slots). A negative slot (a padding row of a CUDA-graph batch) writes nothing. Rotation is the
neox / HF "rotate_half" form: with x = [x1, x2] (halves of head_dim) and the per-position cos/sin
rows (whose two halves are equal), out = [x1*cos - x2*sin, x2*cos + x1*sin], computed in float32.
An FP8 cache stores value / scale, clamped to the format's range.
"""

from __future__ import annotations

import torch

from tokenmill.kernels.triton import check_device, tl, triton

FP8_E4M3_MAX = 448.0


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, k_inv_scale, v_inv_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr, ROTATE: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    offs_half = tl.arange(0, BLOCK_HALF)
    half_ok = offs_half < half
    offs_kv = tl.arange(0, BLOCK_KV)
    kv_ok = offs_kv < NUM_KV_HEADS
    slot = tl.load(slot_ptr + t)
    write = slot >= 0
    # Slots address the cache viewed as [num_kv_heads, num_slots, head_dim].
    cache_off = offs_kv.to(tl.int64)[:, None] * stride_ch + slot * HEAD_DIM + offs_half[None, :]
    kv_mask = kv_ok[:, None] & half_ok[None, :] & write
    if ROTATE:
        cos = tl.load(cos_ptr + t * stride_cos + offs_half, mask=half_ok, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(sin_ptr + t * stride_cos + offs_half, mask=half_ok, other=0.0).to(tl.float32)[None, :]
        offs_h = tl.arange(0, BLOCK_H)
        q_mask = (offs_h < NUM_HEADS)[:, None] & half_ok[None, :]
        q_first = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_half[None, :]
        q1 = tl.load(q_first, mask=q_mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_first + half, mask=q_mask, other=0.0).to(tl.float32)
        tl.store(q_first, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)
        tl.store(q_first + half, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)
    k_first = k_ptr + t * stride_kt + offs_kv[:, None] * stride_kh + offs_half[None, :]
    k1 = tl.load(k_first, mask=kv_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_first + half, mask=kv_mask, other=0.0).to(tl.float32)
    if ROTATE:
        k1_rotated = k1 * cos - k2 * sin
        k2 = k2 * cos + k1 * sin
        k1 = k1_rotated
    v_first = v_ptr + t * stride_vt + offs_kv[:, None] * stride_vh + offs_half[None, :]
    v1 = tl.load(v_first, mask=kv_mask, other=0.0).to(tl.float32)
    v2 = tl.load(v_first + half, mask=kv_mask, other=0.0).to(tl.float32)
    if FP8:
        k1 = tl.clamp(k1 * k_inv_scale, -448.0, 448.0)
        k2 = tl.clamp(k2 * k_inv_scale, -448.0, 448.0)
        v1 = tl.clamp(v1 * v_inv_scale, -448.0, 448.0)
        v2 = tl.clamp(v2 * v_inv_scale, -448.0, 448.0)
    cache_ty = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + cache_off, k1.to(cache_ty), mask=kv_mask)
    tl.store(k_cache_ptr + cache_off + half, k2.to(cache_ty), mask=kv_mask)
    tl.store(v_cache_ptr + cache_off, v1.to(cache_ty), mask=kv_mask)
    tl.store(v_cache_ptr + cache_off + half, v2.to(cache_ty), mask=kv_mask)


def rope_and_write_kv(
    q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """q: [T, H, D] rotated in place; k, v: [T, Hkv, D] written (k rotated) to the caches at
    slot_mapping [T]. cos/sin: [T, ..., D] rows for the tokens' positions (last dim contiguous).
    Without q/cos/sin only the K/V write happens. D must be even."""
    check_device(k)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(2) != 1 or v.stride(2) != 1 or (q is not None and q.stride(2) != 1):
        raise ValueError("q, k and v need a contiguous last (head_dim) dimension")
    if k_cache.shape[0] != num_kv_heads or k_cache.shape[-1] != head_dim or not k_cache.is_contiguous():
        raise ValueError(f"KV cache {tuple(k_cache.shape)} does not match keys {tuple(k.shape)}")
    rotate = q is not None
    if rotate:
        assert cos is not None and sin is not None
        cos, sin = cos.reshape(num_tokens, head_dim), sin.reshape(num_tokens, head_dim)
    else:
        q, cos, sin = k, k, k  # unused placeholders
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    _rope_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, slot_mapping, k_cache, v_cache, 1.0 / k_scale, 1.0 / v_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0),
        NUM_HEADS=q.shape[1], NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(q.shape[1]), BLOCK_KV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), ROTATE=rotate, FP8=fp8, num_warps=4,
    )
