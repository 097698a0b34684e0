"""SiLU-gated FFN activation.

    silu_and_mul(x) -> [T, I]      x: [T, 2I] = [gate | up] (the output of the fused w13 GEMM)

returns ``silu(gate) * up`` in x's dtype.
"""
import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_activation import silu_and_mul_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
