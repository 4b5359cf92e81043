"""RMSNorm and fused residual-add + RMSNorm, one program per row.

The torch/HF arithmetic, up to float32 rounding in the reduction and rsqrt: the residual sum is
rounded to the model dtype (it is what the next layer adds to), the norm runs in float32 on that
rounded sum, its result is rounded to the model dtype and then multiplied by the weight (HF:
weight * hidden.to(input_dtype)).
"""

from __future__ import annotations

import torch

from tokenmill.kernels.triton import check_device, tl, triton


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, eps, stride_x, stride_r, stride_o,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        summed = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32))
        x = summed.to(dtype)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=ok)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, 0) / N + eps)
    normed = (x32 * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, N] -> a new [T, N]. With `residual`, first residual += x in place (rounded to its
    dtype), then normalizes that sum."""
    check_device(x)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return out.view(x.shape)
    res = x2
    if residual is not None:
        res = residual.view(-1, n)
        if res.stride(1) != 1 or res.dtype != x.dtype:
            raise ValueError("residual must match x's dtype and have a contiguous last dimension")
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(rows,)](
        x2, res, weight, out, eps, x2.stride(0), res.stride(0), out.stride(0),
        N=n, BLOCK=block, HAS_RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 512)),
    )
    return out.view(x.shape)
