"""Rotary position embedding in interleaved pairs ("GPT-J" style, LMDeploy's layout).

    rotary_embedding(q, k, positions, rotary_dim, theta) -> (q, k)

q: [T, hq, D], k: [T, hkv, D], positions: [T] int. For every head, the pair of dims
(2i, 2i+1) with 2i < rotary_dim is rotated by the angle ``positions * theta ** (-2i /
rotary_dim)``: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos). Dims >= rotary_dim pass through.
Angles and the rotation are computed in fp32 and cast back. Implementations may work in place;
callers must use the returned tensors.
"""
import torch


def rotary_inv_freq(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """theta ** (-2i / rotary_dim) for i < rotary_dim / 2, fp32 (transformers' formula)."""
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim
    return 1.0 / (theta ** exps)


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         rotary_dim: int, theta: float):
    inv_freq = rotary_inv_freq(rotary_dim, theta, q.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, rotary_dim / 2]
    cos = freqs.cos()[:, None, :]
    sin = freqs.sin()[:, None, :]

    def rotate(x):
        pairs = x[..., :rotary_dim].float().unflatten(-1, (rotary_dim // 2, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        out = out.to(x.dtype)
        if rotary_dim == x.shape[-1]:
            return out
        return torch.cat((out, x[..., rotary_dim:]), dim=-1)

    return rotate(q), rotate(k)


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_rotary import rotary_embedding_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
