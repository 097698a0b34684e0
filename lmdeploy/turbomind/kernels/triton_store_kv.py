"""Triton store_kv (contract: store_kv.py): scatter the new tokens' K/V into the paged pool.

One program per token; it writes all KV heads of K and V for that token to pool row
``slot`` (block ``slot // block_size``, offset ``slot % block_size``); negative slots are
skipped. k, v may be strided views (e.g. column slices of the fused qkv output). The cast to
the cache dtype happens here, and so does int8 quantisation (kv_quant.py): QUANT 1 with static
per-head (scale, zero-point), QUANT 2 online, where each head's absmax gives its scale, stored
beside the block. Division is IEEE (div_rn) and rounding half-to-even, so the integers equal
the reference's.
"""
import torch
import triton
import triton.language as tl

from .kv_quant import MIN_SCALE, ONLINE, QMAX, QMIN, qparams_mode

_QMIN = tl.constexpr(float(QMIN))
_QMAX = tl.constexpr(float(QMAX))
_INV_QMAX = tl.constexpr(1.0 / QMAX)  # fp32 in the kernel, as in online_scales
_MIN_SCALE = tl.constexpr(MIN_SCALE)
_RINT = tl.constexpr(12582912.0)  # 1.5 * 2**23: (x + _RINT) - _RINT is rint(x) for |x| < 2**22


@triton.jit
def _quantize(x, scale, zp):
    """x [H, D] fp32, scale/zp [H] fp32 -> int8 (clamp(rint((x - zp) / scale)))."""
    y = tl.math.div_rn(x - zp[:, None], scale[:, None])
    y = tl.minimum(tl.maximum(y, _QMIN), _QMAX)
    return ((y + _RINT) - _RINT).to(tl.int8)


@triton.jit
def _store_int8(ptrs, x, mask, QP, qp_row, blk, off, offs_h, stride_qpb, stride_qph,
                HKV: tl.constexpr, QUANT: tl.constexpr):
    """Quantise x [H, D] into int8 at ptrs. qp_row: static, the (scale, zp) row pair (K 0,
    V 1) of QP [4, HKV]; online, the offset of this tensor's scales in QP [2, blocks, HKV,
    block_size], where the per-head scales are stored."""
    mask_h = offs_h < HKV
    xf = x.to(tl.float32)
    if QUANT == 1:
        scale = tl.load(QP + (2 * qp_row) * HKV + offs_h, mask=mask_h, other=1.0)
        zp = tl.load(QP + (2 * qp_row + 1) * HKV + offs_h, mask=mask_h, other=0.0)
        tl.store(ptrs, _quantize(xf, scale, zp), mask=mask)
    else:
        absmax = tl.max(tl.where(mask, tl.abs(xf), 0.0), axis=1)
        scale = tl.maximum(absmax * _INV_QMAX, _MIN_SCALE)
        tl.store(ptrs, _quantize(xf, scale, scale * 0.0), mask=mask)
        tl.store(QP + qp_row + blk * stride_qpb + offs_h * stride_qph + off, scale, mask=mask_h)


@triton.jit
def _store_tile(ptrs, x, mask, QP, qp_row, blk, off, offs_h, stride_qpb, stride_qph,
                HKV: tl.constexpr, QUANT: tl.constexpr):
    """Store the [H, D] tile x at ptrs: cast to the cache dtype, or quantised to int8
    (`_store_int8`)."""
    if QUANT == 0:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)
    else:
        _store_int8(ptrs, x, mask, QP, qp_row, blk, off, offs_h, stride_qpb, stride_qph, HKV,
                    QUANT)


@triton.jit
def _slot_ptrs(C, blk, off, offs_h, offs_d, stride_b, stride_s, stride_h):
    return C + blk * stride_b + off * stride_s + offs_h[:, None] * stride_h + offs_d[None, :]


@triton.jit
def _store_kv_kernel(K, V, KC, VC, SLOTS, QP, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     qp_v, stride_qpb, stride_qph,
                     HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    off = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < HKV) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k_ptrs = _slot_ptrs(KC, blk, off, offs_h, offs_d, stride_kcb, stride_kcs, stride_kch)
    _store_tile(k_ptrs, k, mask, QP, 0, blk, off, offs_h, stride_qpb, stride_qph, HKV, QUANT)
    v_ptrs = _slot_ptrs(VC, blk, off, offs_h, offs_d, stride_vcb, stride_vcs, stride_vch)
    _store_tile(v_ptrs, v, mask, QP, qp_v, blk, off, offs_h, stride_qpb, stride_qph, HKV,
                QUANT)


def int8_launch_args(kv_qparams, k_cache, v_cache):
    """(QUANT, QP pointer, (qp_v, stride_qpb, stride_qph)) of a store into the pool: QUANT 0
    for a float cache (QP is a dummy pointer), 1 static, 2 online. Static: V's (scale, zp)
    are row pair 1 of QP; online: V's scales start stride(0) further."""
    mode = qparams_mode(kv_qparams)
    if mode is None:
        return 0, k_cache, (0, 0, 0)
    assert kv_qparams.dtype == torch.float32 and kv_qparams.is_contiguous()
    assert k_cache.dtype == torch.int8 and v_cache.dtype == torch.int8
    if mode == ONLINE:
        return 2, kv_qparams, tuple(kv_qparams.stride()[:3])
    return 1, kv_qparams, (1, 0, 0)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_qparams: torch.Tensor = None) -> None:
    T, hkv, D = k.shape
    if T == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    quant, qp, qp_strides = int8_launch_args(kv_qparams, k_cache, v_cache)
    block_h = triton.next_power_of_2(hkv)
    block_d = triton.next_power_of_2(D)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, qp, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), *qp_strides, HKV=hkv, HEAD_DIM=D,
        BLOCK_H=block_h, BLOCK_D=block_d, PAGE=k_cache.shape[1], QUANT=quant,
        num_warps=max(1, min(8, block_h * block_d // 1024)))
