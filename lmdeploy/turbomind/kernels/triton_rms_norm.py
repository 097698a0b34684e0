"""Triton RMSNorm with the optional fused residual add (contract: rms_norm.py).

One program per token row; the row (up to a few tens of thousands of elements) is one tile.
Arithmetic follows the reference's rounding: x + residual is rounded to x's dtype (that is
the new residual), statistics in fp32, the normalised value rounded to x's dtype, then the
weight multiply rounded to the output dtype.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .pdl import launch_opts, pdl_enter


@triton.jit
def _rms_norm_kernel(X, R, W, O, RO, eps, H, stride_x, stride_r, stride_o, stride_ro,
                     HAS_RES: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr):
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    w = tl.load(W + offs, mask=mask, other=0.0)  # a weight: read before the wait (pdl.py)
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RO + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    y = (xf * tl.rsqrt(var + eps)).to(X.dtype.element_ty)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(O + row * stride_o + offs, out.to(O.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: Optional[torch.Tensor] = None):
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    o2 = out.view(-1, H)
    block = triton.next_power_of_2(H)
    warps = max(1, min(16, block // 512))
    if residual is None:
        if T:
            _rms_norm_kernel[(T,)](x2, x2, weight, o2, o2, eps, H, x2.stride(0), 0, o2.stride(0),
                                   0, HAS_RES=False, BLOCK_H=block, num_warps=warps,
                                   **launch_opts(x.device))
        return out
    r2 = residual.reshape(-1, H)
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    nr2 = new_res.view(-1, H)
    if T:
        _rms_norm_kernel[(T,)](x2, r2, weight, o2, nr2, eps, H, x2.stride(0), r2.stride(0),
                               o2.stride(0), nr2.stride(0), HAS_RES=True, BLOCK_H=block,
                               num_warps=warps, **launch_opts(x.device))
    return out, new_res
