"""int8 KV cache (quant_policy 4): the quantisation formulas, as torch references.

One layer's quantisation parameters travel to `store_kv` and `paged_attention` as one optional
fp32 tensor, ``kv_qparams``, whose rank says the mode:

* ``None``: the pool holds K/V in the compute dtype (no quantisation);
* ``[4, hkv]`` -- static scales (calibrated files; per-tensor files arrive broadcast to their
  heads): rows ``k_scale, k_zp, v_scale, v_zp`` per KV head (zp 0 when symmetric).
  ``q = clamp(round_half_even((x - zp) / scale), -128, 127)``, ``x = q * scale + zp``;
* ``[2, num_blocks, hkv, block_size]`` -- online: a symmetric scale per token and head, for
  K (row 0) and V (row 1), written by `store_kv` beside the int8 blocks (head-major inside a
  block, so the attention kernels read a tile's scales contiguously):
  ``scale = max(absmax over head_dim * fp32(1/127), 1e-5)`` (a multiply, not a division: the
  same bits from torch on any device, which turns division by a scalar into a multiply on
  CUDA), ``q = clamp(round(x / scale))``, ``x = q * scale``.

The Triton kernels compute exactly these integers (IEEE division, round half to even).
"""
from typing import Optional

import torch

QMIN, QMAX = -128, 127
MIN_SCALE = 1e-5  # scales are clamped below (a constant channel never gives a 0 scale)
STATIC, ONLINE = 'static', 'online'


def qparams_mode(kv_qparams: Optional[torch.Tensor]) -> Optional[str]:
    if kv_qparams is None:
        return None
    if kv_qparams.dim() == 2 and kv_qparams.shape[0] == 4:
        return STATIC
    if kv_qparams.dim() == 4 and kv_qparams.shape[0] == 2:
        return ONLINE
    raise ValueError(f'kv_qparams must be [4, hkv] (static) or [2, blocks, hkv, block_size] '
                     f'(online), got {tuple(kv_qparams.shape)}')


def quantize(x: torch.Tensor, scale, zp=0.0) -> torch.Tensor:
    """int8 of x (any float dtype); scale/zp broadcast against x."""
    y = (x.float() - zp) / scale
    return y.clamp(QMIN, QMAX).round().to(torch.int8)


def dequantize(q: torch.Tensor, scale, zp=0.0) -> torch.Tensor:
    """fp32 values of int8 q."""
    return q.float() * scale + zp


def online_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-vector symmetric scale over the last dim: [..., D] -> [...] fp32."""
    return (x.float().abs().amax(-1) * (1.0 / QMAX)).clamp_min(MIN_SCALE)
