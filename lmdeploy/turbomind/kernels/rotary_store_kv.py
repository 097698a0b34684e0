"""Rotary embedding of q and k fused with the write of k and v into the paged pool.

    rotary_store_kv(q, k, v, positions, rotary_dim, theta, k_cache, v_cache, slot_mapping,
                    kv_qparams=None) -> q

Exactly ``q, k = rotary_embedding(q, k, ...)`` (rotary.py) followed by ``store_kv(k, v, ...)``
(store_kv.py), returning the rotated q: the pool receives the rotated k (rounded to k's dtype
first, then cast or quantised as store_kv does) and v. A negative slot skips the store but the
token's q is still rotated. q may be rotated in place (callers use the returned tensor); k and v
are not written. One launch per layer instead of two, and k is not written back and re-read.
"""
import torch

from .rotary import rotary_embedding_ref
from .store_kv import store_kv_ref


def rotary_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, rotary_dim: int, theta: float,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        kv_qparams: torch.Tensor = None) -> torch.Tensor:
    q, k = rotary_embedding_ref(q, k, positions, rotary_dim, theta)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, kv_qparams)
    return q


try:  # the Triton kernel beside its reference (kernels.select picks it on CUDA)
    from .triton_rotary_store_kv import rotary_store_kv_triton  # noqa: E402,F401
except ImportError:  # no triton
    pass
