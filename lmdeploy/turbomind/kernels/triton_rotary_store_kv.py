"""Triton rotary_store_kv (contract: rotary_store_kv.py): rotary embedding of q and k and the
write of k and v into the paged pool, one launch.

Grid (T, NQ + 2 NKV): for each token, NQ programs rotate blocks of BLOCK_HQ q heads in place,
NKV programs rotate blocks of BLOCK_HKV k heads in registers and write them to pool row
``slot``, NKV programs write the v heads; the k/v programs of a negative slot do nothing. The
rotated k is never written back to the qkv buffer. By default a block is a whole head group up
to 4096 elements (grid (T, 3) at 32 x 128); ``cfg`` overrides BLOCK_HQ / BLOCK_HKV / num_warps.

The arithmetic is the separate kernels' (triton_rotary.py, triton_store_kv.py), so the results
are theirs bit for bit: angles ``positions[t] * inv_freq`` from the same cached fp32 inv_freq,
fp32 cos/sin and rotation, and the rotated k rounded to k's dtype before it is cast to the
cache dtype or quantised to int8 (triton_store_kv's _store_int8: static, or online with the
scales written beside the block).
"""
import torch
import triton
import triton.language as tl

from .pdl import launch_opts, pdl_enter
from .triton_rotary import _inv_freq
from .triton_store_kv import _slot_ptrs, _store_tile, int8_launch_args, store_kv_triton

MAX_TILE = 4096  # elements of one program's [heads, head_dim] tile by default


@triton.jit
def _cos_sin(POS, INV, t, ROT: tl.constexpr, BLOCK_D: tl.constexpr):
    pos = tl.load(POS + t).to(tl.float32)
    offs_i = tl.arange(0, BLOCK_D // 2)
    inv = tl.load(INV + offs_i, mask=offs_i < ROT // 2, other=0.0)
    ang = pos * inv
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _rotate(x, cos, sin, ROT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """x [BLOCK_H, BLOCK_D] -> fp32 with the pairs (2i, 2i+1), 2i < ROT, rotated; the other
    dims unchanged (selected, not rotated by 0: that would turn -0 into +0)."""
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), [BLOCK_H, BLOCK_D // 2, 2]))
    y0 = x0 * cos[None, :] - x1 * sin[None, :]
    y1 = x0 * sin[None, :] + x1 * cos[None, :]
    rot = (tl.arange(0, BLOCK_D // 2) < ROT // 2)[None, :]
    y = tl.join(tl.where(rot, y0, x0), tl.where(rot, y1, x1))
    return tl.reshape(y, [BLOCK_H, BLOCK_D])


@triton.jit
def _store_heads(X, C, t, hb, slot, stride_xt, stride_xh, stride_cb, stride_cs, stride_ch,
                 QP, qp_row, stride_qpb, stride_qph, POS, INV, HKV: tl.constexpr,
                 HEAD_DIM: tl.constexpr, ROT: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
                 ROTATE: tl.constexpr):
    """Head block hb of token t's k (ROTATE) or v, written to pool row slot."""
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < HKV) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(X + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :], mask=mask,
                other=0.0)
    if ROTATE:  # rounded to k's dtype, as the separate rotary kernel leaves it in memory
        cos, sin = _cos_sin(POS, INV, t, ROT, BLOCK_D)
        x = _rotate(x, cos, sin, ROT, BLOCK_H, BLOCK_D).to(X.dtype.element_ty)
    blk = slot // PAGE
    off = slot % PAGE
    ptrs = _slot_ptrs(C, blk, off, offs_h, offs_d, stride_cb, stride_cs, stride_ch)
    _store_tile(ptrs, x, mask, QP, qp_row, blk, off, offs_h, stride_qpb, stride_qph, HKV, QUANT)


@triton.jit
def _rotary_store_kv_kernel(
        Q, K, V, POS, INV, KC, VC, SLOTS, QP, stride_qt, stride_qh, stride_kt, stride_kh,
        stride_vt, stride_vh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs,
        stride_vch, qp_v, stride_qpb, stride_qph,
        HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, ROT: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
        NQ: tl.constexpr, NKV: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
        USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    if j < NQ:  # q heads, rotated in place (dims >= ROT are not touched)
        offs_h = j * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < HQ) & (offs_d[None, :] < ROT)
        ptrs = Q + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0)
        cos, sin = _cos_sin(POS, INV, t, ROT, BLOCK_D)
        tl.store(ptrs, _rotate(x, cos, sin, ROT, BLOCK_HQ, BLOCK_D).to(x.dtype), mask=mask)
    else:
        slot = tl.load(SLOTS + t).to(tl.int64)
        if slot >= 0:
            if j < NQ + NKV:
                _store_heads(K, KC, t, j - NQ, slot, stride_kt, stride_kh, stride_kcb,
                             stride_kcs, stride_kch, QP, 0, stride_qpb, stride_qph, POS, INV,
                             HKV, HEAD_DIM, ROT, BLOCK_HKV, BLOCK_D, PAGE, QUANT, True)
            else:
                _store_heads(V, VC, t, j - NQ - NKV, slot, stride_vt, stride_vh, stride_vcb,
                             stride_vcs, stride_vch, QP, qp_v, stride_qpb, stride_qph, POS,
                             INV, HKV, HEAD_DIM, ROT, BLOCK_HKV, BLOCK_D, PAGE, QUANT, False)


def rotary_store_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           positions: torch.Tensor, rotary_dim: int, theta: float,
                           k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, kv_qparams: torch.Tensor = None,
                           cfg: dict = None) -> torch.Tensor:
    T, hq, D = q.shape
    hkv = k.shape[1]
    if T == 0:
        return q
    if rotary_dim == 0:
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping, kv_qparams)
        return q
    assert rotary_dim % 2 == 0 and rotary_dim <= D
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    quant, qp, qp_strides = int8_launch_args(kv_qparams, k_cache, v_cache)
    block_d = triton.next_power_of_2(D)
    cap = max(1, MAX_TILE // block_d)
    c = dict(BLOCK_HQ=min(triton.next_power_of_2(hq), cap),
             BLOCK_HKV=min(triton.next_power_of_2(hkv), cap), num_warps=None)
    c.update(cfg or {})
    bhq, bhkv = c['BLOCK_HQ'], c['BLOCK_HKV']
    nq, nkv = triton.cdiv(hq, bhq), triton.cdiv(hkv, bhkv)
    num_warps = c['num_warps'] or max(1, min(8, max(bhq, bhkv) * block_d // 1024))
    inv = _inv_freq(rotary_dim, theta, q.device)
    _rotary_store_kv_kernel[(T, nq + 2 * nkv)](
        q, k, v, positions, inv, k_cache, v_cache, slot_mapping, qp, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), *qp_strides, HQ=hq, HKV=hkv, HEAD_DIM=D, ROT=rotary_dim,
        BLOCK_HQ=bhq, BLOCK_HKV=bhkv, BLOCK_D=block_d, NQ=nq, NKV=nkv, PAGE=k_cache.shape[1],
        QUANT=quant, num_warps=num_warps, **launch_opts(q.device))
    return q
