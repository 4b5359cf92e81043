"""FP8-weight x bf16-activation GEMM for small batches (decode): y = x @ (W_fp8 * scale[:, None])^T.

At decode batch sizes a linear layer is a pass over its weights, so halving the weight bytes (FP8
instead of bf16) is the whole gain; quantizing the activations too (what torch._scaled_mm needs)
would buy nothing and costs extra kernels. Each program owns BLOCK_N output channels and one K
range (split-K when N alone gives too few programs to keep every multiprocessor streaming), widens
the FP8 weights to the activation dtype in registers, and applies the per-channel scale at the end.
Split-K partial sums go to a float32 buffer that is summed afterwards.
"""

from __future__ import annotations

import torch

from tokenmill.kernels.triton import check_device, compute_dtype, dot_precision, tl, triton

MAX_M = 16  # rows handled by one tile; larger batches use torch._scaled_mm


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DOT_DTYPE)
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_off = pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _split_k(n_blocks: int, k: int, block_k: int, num_sms: int) -> int:
    split = 1
    while n_blocks * split < 2 * num_sms and k // (split * 2) >= 4 * block_k:
        split *= 2
    return split


def w8a16_gemm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
    block_n: int = 64, block_k: int = 128, split_k: int | None = None,
) -> torch.Tensor:
    """x: [M, K] (M <= MAX_M, bf16/fp16/fp32), weight: [N, K] float8_e4m3fn, scale: [N] float32
    -> [M, N] in x's dtype."""
    check_device(x)
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_M:
        raise ValueError(f"w8a16_gemm handles at most {MAX_M} rows, got {m}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight need a contiguous last dimension")
    n_blocks = triton.cdiv(n, block_n)
    if split_k is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        split_k = _split_k(n_blocks, k, block_k, sms)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    _w8a16_kernel[(n_blocks, split_k)](
        x, weight, scale, out, m, n, k, k_per_split, x.stride(0), weight.stride(0), n,
        m * n if split_k > 1 else 0,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=compute_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype),
        num_warps=4, num_stages=4,
    )
    if split_k > 1:
        out = out.sum(0).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_o, K: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    # IEEE divisions (div_rn), as torch computes them, so the codes match quant.fp8 bit for bit.
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), 0), 448.0), 1e-12)
    q = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0)
    tl.store(out_ptr + row * stride_o + offs, q.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) FP8 quantization in one kernel: x [M, K] -> (e4m3 [M, K], float32 scale
    [M, 1]) with each row's largest magnitude at 448; the same values as quant.fp8.quantize_per_token."""
    check_device(x)
    m, k = x.shape
    out = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(m,)](x, out, scale, x.stride(0), out.stride(0), K=k, BLOCK=block,
                                    num_warps=min(16, max(1, block // 1024)))
    return out, scale
