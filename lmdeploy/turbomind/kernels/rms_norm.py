"""RMSNorm, optionally fused with the residual add.

    rms_norm(x, weight, eps)                 -> out
    rms_norm(x, weight, eps, residual)       -> (out, new_residual)   new_residual = x + residual

x, residual: [T, H] in the compute dtype; weight: [H]. The statistics are computed in fp32;
the normalised value is cast back to x's dtype before the weight multiply (transformers'
LlamaRMSNorm order, so fp16/bf16 round the same way).
"""
from typing import Optional

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None):
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_rms_norm import rms_norm_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
