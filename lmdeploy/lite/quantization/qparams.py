"""int8 KV-cache quantization parameters: the formulas of the int8-KV contract (docs/en/kv_int8.md).

Symmetric (v0.0.2):   scale = absmax / 127
                      q = clamp(round_half_even(x / scale), -128, 127),  x ~ q * scale
Asymmetric (v0.0.4):  scale = (max - min) / 255,  zp = (max + min) / 2
                      q = clamp(round((x - zp) / scale), -128, 127),  x ~ q * scale + zp

Scales are clamped below at MIN_SCALE, so a K or V that is all zeros still gets a usable scale.
Everything is computed in float32, the dtype of the scale files.
"""
from typing import Tuple

import torch

QMAX = 127  # largest int8 value: absmax maps onto it
QLEVELS = 255  # int8 steps between the smallest and the largest value
MIN_SCALE = 1e-5


def symmetric_scale(absmax: torch.Tensor) -> torch.Tensor:
    return (absmax.float() / QMAX).clamp_min(MIN_SCALE)


def asymmetric_qparams(min_val: torch.Tensor, max_val: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) for values in [min_val, max_val]."""
    min_val, max_val = min_val.float(), max_val.float()
    return ((max_val - min_val) / QLEVELS).clamp_min(MIN_SCALE), (max_val + min_val) / 2


def kv_qparams(k_min: torch.Tensor, k_max: torch.Tensor, v_min: torch.Tensor, v_max: torch.Tensor,
               symmetric: bool) -> torch.Tensor:
    """The rows of a scale file from per-group (per head, or one group) min and max of K and V.

    Returns float32 [2, n] (rows k_scale, v_scale) when `symmetric`, else [4, n] (rows k_scale,
    k_zp, v_scale, v_zp), where n is the length of the inputs.
    """
    if symmetric:
        return torch.stack([symmetric_scale(torch.maximum(-k_min, k_max)),
                            symmetric_scale(torch.maximum(-v_min, v_max))])
    return torch.stack([*asymmetric_qparams(k_min, k_max), *asymmetric_qparams(v_min, v_max)])
