"""Triton SiLU-and-mul (contract: activation.py): out = silu(x[:, :I]) * x[:, I:].

Grid (T, cdiv(I, BLOCK)); rounding as the reference: silu in fp32 rounded to x's dtype, then
the product rounded again.
"""
import torch
import triton
import triton.language as tl

from .pdl import launch_opts, pdl_enter


@triton.jit
def _silu_and_mul_kernel(X, O, I, stride_x, stride_o, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + I + offs, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty)
    out = s.to(tl.float32) * u.to(tl.float32)
    tl.store(O + row * stride_o + offs, out.to(O.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    two_i = x.shape[-1]
    inter = two_i // 2
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    o2 = out.view(-1, inter)
    if T:
        block = min(2048, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
            x2, o2, inter, x2.stride(0), o2.stride(0), BLOCK=block,
            num_warps=max(1, min(8, block // 256)), **launch_opts(x.device))
    return out
