"""Triton store_kv (contract: store_kv.py): scatter the new tokens' K/V into the paged pool.

One program per token; it writes all KV heads of K and V for that token to pool row
``slot`` (block ``slot // block_size``, offset ``slot % block_size``); negative slots are
skipped. k, v may be strided views (e.g. column slices of the fused qkv output). The cast to
the cache dtype happens here (the place for int8 quantisation later).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(K, V, KC, VC, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, PAGE: tl.constexpr):
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
    tl.store(KC + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch
             + offs_d[None, :], k.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch
             + offs_d[None, :], v.to(VC.dtype.element_ty), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    T, hkv, D = k.shape
    if T == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    block_h = triton.next_power_of_2(hkv)
    block_d = triton.next_power_of_2(D)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), HKV=hkv, HEAD_DIM=D, BLOCK_H=block_h,
        BLOCK_D=block_d, PAGE=k_cache.shape[1],
        num_warps=max(1, min(8, block_h * block_d // 1024)))
