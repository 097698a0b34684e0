"""Write the new tokens' K/V into the paged pool.

    store_kv(k, v, k_cache, v_cache, slot_mapping) -> None

k, v: [T, hkv, D]; k_cache, v_cache: [num_blocks, block_size, hkv, D] (one layer of the pool,
see kv_cache.py); slot_mapping: [T] int64, token t goes to row ``slot_mapping[t]`` of the pool
viewed as [num_blocks * block_size, hkv, D]; a negative slot is skipped. Writes in place.
"""
import torch


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    if bool(keep.all()):
        kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, slot_mapping, v.to(vc.dtype))
    else:
        slots = slot_mapping[keep]
        kc.index_copy_(0, slots, k[keep].to(kc.dtype))
        vc.index_copy_(0, slots, v[keep].to(vc.dtype))


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_store_kv import store_kv_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
