"""Write the new tokens' K/V into the paged pool.

    store_kv(k, v, k_cache, v_cache, slot_mapping, kv_qparams=None) -> None

k, v: [T, hkv, D]; k_cache, v_cache: [num_blocks, block_size, hkv, D] (one layer of the pool,
see kv_cache.py); slot_mapping: [T] int64, token t goes to row ``slot_mapping[t]`` of the pool
viewed as [num_blocks * block_size, hkv, D]; a negative slot is skipped. Writes in place.
kv_qparams (int8 caches, see kv_quant.py): static ``[4, hkv]`` scales quantise with the given
scale/zero-point; online ``[2, num_blocks, hkv, block_size]`` receives each written token's
per-head scales (K row 0, V row 1).
"""
import torch

from .kv_quant import STATIC, online_scales, qparams_mode, quantize


def _encode(x: torch.Tensor, cache: torch.Tensor, qparams, row: int):
    """x [T, hkv, D] as the cache stores it; plus the per-token scales [T, hkv] when online."""
    mode = qparams_mode(qparams)
    if mode is None:
        return x.to(cache.dtype), None
    if mode == STATIC:
        scale, zp = qparams[2 * row], qparams[2 * row + 1]
        return quantize(x, scale[:, None], zp[:, None]), None
    scales = online_scales(x)
    return quantize(x, scales[..., None]), scales


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_qparams: torch.Tensor = None) -> None:
    keep = slot_mapping >= 0
    every = bool(keep.all())
    slots = slot_mapping if every else slot_mapping[keep]
    for row, (x, cache) in enumerate(((k, k_cache), (v, v_cache))):
        if not every:
            x = x[keep]
        values, scales = _encode(x, cache, kv_qparams, row)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, values)
        if scales is not None:  # [blocks, hkv, block_size]
            bs = cache.shape[1]
            kv_qparams[row][slots // bs, :, slots % bs] = scales


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_store_kv import store_kv_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
