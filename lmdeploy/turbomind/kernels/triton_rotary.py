"""Triton rotary embedding, interleaved pairs, in place on q and k (contract: rotary.py).

One program per token rotates every q and k head: pair (2i, 2i+1), i < rotary_dim / 2, by
``positions[t] * inv_freq[i]``. inv_freq is the reference's fp32 tensor (`rotary_inv_freq`),
computed once per (rotary_dim, theta, device) and cached, so the angles match the reference
bit for bit; cos/sin and the rotation are fp32, rounded back to the input dtype. Dims past
rotary_dim are not touched. Returns (q, k), the same tensors.
"""
import torch
import triton
import triton.language as tl

from .rotary import rotary_inv_freq


@triton.jit
def _rotate_heads(X, t, stride_t, stride_h, cos, sin, offs_i, NH: tl.constexpr,
                  BLOCK_NH: tl.constexpr, HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_NH)
    mask = (offs_h[:, None] < NH) & (offs_i[None, :] < HALF)
    base = X + t * stride_t + offs_h[:, None] * stride_h + 2 * offs_i[None, :]
    x0 = tl.load(base, mask=mask, other=0.0)
    x1 = tl.load(base + 1, mask=mask, other=0.0)
    x0f = x0.to(tl.float32)
    x1f = x1.to(tl.float32)
    y0 = x0f * cos[None, :] - x1f * sin[None, :]
    y1 = x0f * sin[None, :] + x1f * cos[None, :]
    tl.store(base, y0.to(x0.dtype), mask=mask)
    tl.store(base + 1, y1.to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, POS, INV, stride_qt, stride_qh, stride_kt, stride_kh,
                   HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HKV: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.float32)
    offs_i = tl.arange(0, BLOCK_HALF)
    inv = tl.load(INV + offs_i, mask=offs_i < HALF, other=0.0)
    ang = pos * inv
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    _rotate_heads(Q, t, stride_qt, stride_qh, cos, sin, offs_i, HQ, BLOCK_HQ, HALF)
    _rotate_heads(K, t, stride_kt, stride_kh, cos, sin, offs_i, HKV, BLOCK_HKV, HALF)


_INV_FREQ = {}


def _inv_freq(rotary_dim: int, theta: float, device) -> torch.Tensor:
    key = (rotary_dim, float(theta), str(device))
    t = _INV_FREQ.get(key)
    if t is None:
        t = rotary_inv_freq(rotary_dim, theta, device).contiguous()
        _INV_FREQ[key] = t
    return t


def rotary_embedding_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                            rotary_dim: int, theta: float):
    T, hq, D = q.shape
    hkv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and rotary_dim % 2 == 0
    if T == 0 or rotary_dim == 0:
        return q, k
    half = rotary_dim // 2
    inv = _inv_freq(rotary_dim, theta, q.device)
    block_half = triton.next_power_of_2(half)
    block_hq = triton.next_power_of_2(hq)
    _rotary_kernel[(T,)](q, k, positions, inv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         HQ=hq, HKV=hkv, BLOCK_HQ=block_hq,
                         BLOCK_HKV=triton.next_power_of_2(hkv), HALF=half,
                         BLOCK_HALF=block_half,
                         num_warps=max(1, min(8, block_hq * block_half // 512)))
    return q, k
