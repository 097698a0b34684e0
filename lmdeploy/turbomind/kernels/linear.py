"""Dense projection of the weight GEMMs (qkv, wo, w13, w2) and the LM head.

    linear(x, w) -> [..., N]     x: [..., K] (fp16 / bf16 / fp32), w: [K, N] in x's dtype

returns ``x @ w`` in x's dtype, accumulated in fp32. w is either the [in, out] weight as the
workspace stores it (N contiguous) or the transposed view of an [out, in] matrix (K
contiguous: ``linear(x, output.t()) == F.linear(x, output)`` for the LM head), without a copy.
The Triton kernel (triton_linear.py) streams the weight for the shapes its TUNED table
measured faster (decode rows) and calls torch.matmul (cuBLAS) for every other shape, so a
caller can always use it.
"""
import torch


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_linear import linear_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
