"""Triton rotary embedding, interleaved pairs, in place on q and k (contract: rotary.py).

Grid (T, 2): a program rotates all q heads (or all k heads) of one token: pair (2i, 2i+1),
i < rotary_dim / 2, by ``positions[t] * inv_freq[i]``. Each head's rotary dims are loaded and
stored contiguously (16-byte accesses) and the pairs are split in registers (a first version
with stride-2 scalar accesses ran at 0.2 TB/s on the H100, see benchmark/NOTES.md).
inv_freq is the reference's fp32 tensor (`rotary_inv_freq`), computed once per (rotary_dim,
theta, device) and cached, so the angles match the reference bit for bit; cos/sin and the
rotation are fp32, rounded back to the input dtype. Dims past rotary_dim are not touched.
Returns (q, k), the same tensors.
"""
import torch
import triton
import triton.language as tl

from .rotary import rotary_inv_freq


@triton.jit
def _rotate_heads(X, t, stride_t, stride_h, cos, sin, NH: tl.constexpr, BLOCK_NH: tl.constexpr,
                  ROT: tl.constexpr, BLOCK_ROT: tl.constexpr):
    # contiguous [heads, rotary dims] tile (16-byte accesses); pairs split in registers
    offs_h = tl.arange(0, BLOCK_NH)
    offs_r = tl.arange(0, BLOCK_ROT)
    mask = (offs_h[:, None] < NH) & (offs_r[None, :] < ROT)
    ptrs = X + t * stride_t + offs_h[:, None] * stride_h + offs_r[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_NH, BLOCK_ROT // 2, 2]))
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x0 * sin[None, :] + x1 * cos[None, :]
    y = tl.reshape(tl.join(y0, y1), [BLOCK_NH, BLOCK_ROT])
    tl.store(ptrs, y.to(x.dtype), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, POS, INV, stride_qt, stride_qh, stride_kt, stride_kh,
                   HQ: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HKV: tl.constexpr, ROT: tl.constexpr, BLOCK_ROT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.float32)
    offs_i = tl.arange(0, BLOCK_ROT // 2)
    inv = tl.load(INV + offs_i, mask=offs_i < ROT // 2, other=0.0)
    ang = pos * inv
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    if tl.program_id(1) == 0:
        _rotate_heads(Q, t, stride_qt, stride_qh, cos, sin, HQ, BLOCK_HQ, ROT, BLOCK_ROT)
    else:
        _rotate_heads(K, t, stride_kt, stride_kh, cos, sin, HKV, BLOCK_HKV, ROT, BLOCK_ROT)


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
    inv = _inv_freq(rotary_dim, theta, q.device)
    block_rot = max(2, triton.next_power_of_2(rotary_dim))
    block_hq = triton.next_power_of_2(hq)
    # grid (T, 2): q heads and k heads in separate programs
    _rotary_kernel[(T, 2)](q, k, positions, inv, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), HQ=hq, HKV=hkv, BLOCK_HQ=block_hq,
                           BLOCK_HKV=triton.next_power_of_2(hkv), ROT=rotary_dim,
                           BLOCK_ROT=block_rot,
                           num_warps=max(1, min(8, block_hq * block_rot // 1024)))
    return q, k
