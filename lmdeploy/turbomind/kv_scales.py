"""int8 KV scales from a workspace's weight directory (``quant_policy = 4``).

Files (written by ``python -m lmdeploy.lite.apis.kv_qparams``), raw little-endian float32:

* ``kv_int8_scales = per_tensor``: ``layers.{i}.past_kv_scale.{r}.weight``, one per layer and
  on-disk TP rank r: 2 floats ``[k_scale, v_scale]`` (symmetric, v0.0.2) or 4 floats
  ``[k_scale, k_zp, v_scale, v_zp]`` (asymmetric, v0.0.4), over all of rank r's KV heads;
* ``kv_int8_scales = per_head``: ``layers.{i}.past_kv_scale.{r}.per_head.weight``, row-major
  ``[2, h]`` (k_scale; v_scale) or ``[4, h]`` (k_scale; k_zp; v_scale; v_zp), h = rank r's
  KV heads.

Rank r of the workspace's ``tensor_para_size`` owns KV heads ``[r h, (r + 1) h)``.
``load_kv_scales(cfg, rank, tp)`` returns ``[num_layer, 4, kv_head_num // tp]`` fp32 (rows
k_scale, k_zp, v_scale, v_zp; zp 0 for symmetric files) for runtime rank `rank` of `tp`, which
may differ from the workspace's split: every head takes the values of the file that covers it
(per-head files re-slice exactly; a per-tensor file's values apply to each of its heads). The
kernels scale per head, so a runtime rank spanning several file ranks keeps each file's own
scale (no max over them is needed), and one covering part of a file rank's heads keeps that
file's bound, which holds for every head it covers.

Unlike v0.0.2 (a null dereference), a missing file, a wrong size, or a scale that is not finite
and > 0 (or a zero-point that is not finite) is a `KVScaleError` naming the file.
"""
import os
import os.path as osp
from typing import Optional

import numpy as np
import torch

from .config import EngineConfig
from .weights import WeightError


class KVScaleError(WeightError):
    """A missing or malformed int8 KV scale file; the message names the file."""


def scale_file(weight_dir: str, layer: int, rank: int, per_head: bool = False) -> str:
    suffix = 'per_head.weight' if per_head else 'weight'
    return osp.join(weight_dir, f'layers.{layer}.past_kv_scale.{rank}.{suffix}')


def read_scale_file(path: str, heads: int, per_head: bool) -> torch.Tensor:
    """One file as ``[4, heads]`` fp32 (k_scale, k_zp, v_scale, v_zp)."""
    if not osp.isfile(path):
        raise KVScaleError(
            f'int8 KV scale file {path} is missing (quant_policy=4, kv_int8_scales='
            f'{"per_head" if per_head else "per_tensor"}); write it with `python -m '
            'lmdeploy.lite.apis.kv_qparams --model HF_MODEL --output_dir <workspace>/'
            'triton_models/weights`, or set kv_int8_scales=online (no calibration)')
    width = heads if per_head else 1
    size = os.path.getsize(path)
    if size not in (2 * width * 4, 4 * width * 4):
        want = f'[2, {heads}] or [4, {heads}] float32' if per_head else '2 or 4 float32'
        raise KVScaleError(f'int8 KV scale file {path} has {size} bytes; expected {want} '
                           f'({2 * width * 4} or {4 * width * 4} bytes)')
    rows = torch.from_numpy(np.fromfile(path, dtype='<f4').astype(np.float32))
    rows = rows.reshape(-1, width)
    if rows.shape[0] == 2:  # symmetric: zero-points 0
        rows = torch.stack([rows[0], torch.zeros(width), rows[1], torch.zeros(width)])
    names = ('k_scale', 'k_zp', 'v_scale', 'v_zp')
    for j, name in enumerate(names):
        vals = rows[j]
        bad = ~torch.isfinite(vals) if name.endswith('zp') else ~(torch.isfinite(vals)
                                                                  & (vals > 0))
        if bool(bad.any()):
            where = f' (head {int(bad.nonzero()[0])})' if per_head else ''
            rule = 'finite' if name.endswith('zp') else 'finite and > 0'
            raise KVScaleError(f'int8 KV scale file {path}: {name}{where} is '
                               f'{float(vals[bad][0])!r}; it must be {rule}')
    return rows.expand(4, heads).contiguous()


def load_kv_scales(cfg: EngineConfig, rank: int = 0, tp: Optional[int] = None,
                   mode: Optional[str] = None) -> torch.Tensor:
    """``[num_layer, 4, kv_head_num // tp]`` fp32 on CPU for runtime rank `rank` of `tp`
    (default: the workspace's split); mode: 'per_tensor' | 'per_head' (default
    cfg.kv_int8_scales)."""
    mode = mode or cfg.kv_int8_scales
    if mode not in ('per_tensor', 'per_head'):
        raise ValueError(f"scale files exist for per_tensor / per_head, not {mode!r}")
    disk_tp = cfg.tensor_para_size
    tp = disk_tp if tp is None else int(tp)
    heads = cfg.kv_head_num
    if heads % tp or heads % disk_tp:
        raise KVScaleError(f'kv_head_num {heads} is not divisible by tp={tp} (and the '
                           f'workspace tensor_para_size {disk_tp})')
    h, hd = heads // tp, heads // disk_tp
    first, last = rank * h, (rank + 1) * h  # this rank's heads
    ranks = range(first // hd, (last - 1) // hd + 1)  # the file ranks covering them
    out = torch.empty(cfg.num_layer, 4, h)
    for i in range(cfg.num_layer):
        parts = [read_scale_file(scale_file(cfg.weight_dir, i, r, mode == 'per_head'), hd,
                                 mode == 'per_head') for r in ranks]
        whole = torch.cat(parts, dim=1)  # heads [ranks[0] * hd, (ranks[-1] + 1) * hd)
        start = first - ranks[0] * hd
        out[i] = whole[:, start:start + h]
    return out
