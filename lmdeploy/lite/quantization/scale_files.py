"""The int8 KV scale files in a workspace's weight dir (raw little-endian float32, no header).

* `layers.{i}.past_kv_scale.{tp}.weight`: per TP rank, one group over all of the rank's KV
  heads: `[k_scale, v_scale]` (symmetric, v0.0.2) or `[k_scale, k_zp, v_scale, v_zp]`
  (asymmetric, v0.0.4).
* `layers.{i}.past_kv_scale.{tp}.per_head.weight`: float32 row-major [2, h] or [4, h], the same
  rows per KV head of the rank (h = kv_heads / num_tp).

Rank t owns the KV heads [t*h, (t+1)*h), deploy's split. A set of files is written atomically:
every file to a temporary name first, then all renamed into place.
"""
import os
import os.path as osp
import re
import shutil
import tempfile
from typing import Dict, Iterable, List

import numpy as np

from .observer import KVObserver
from .qparams import kv_qparams

PER_HEAD_PATTERN = re.compile(r'^layers\.\d+\.past_kv_scale\.\d+\.per_head\.weight$')


def scale_file_name(layer: int, tp: int, per_head: bool = False) -> str:
    return f'layers.{layer}.past_kv_scale.{tp}.{"per_head." if per_head else ""}weight'


def scale_arrays(observer: KVObserver, num_tp: int, symmetric: bool, per_head: bool
                 ) -> Dict[str, np.ndarray]:
    """File name -> float32 array for every layer and TP rank (per-head files too if asked)."""
    heads = observer.num_heads
    if heads % num_tp:
        raise ValueError(f'num_tp {num_tp} does not divide the {heads} KV heads')
    h = heads // num_tp
    arrays = {}
    for layer in range(observer.num_layers):
        stats = observer.stats(layer)
        for tp in range(num_tp):
            k_min, k_max, v_min, v_max = (s[tp * h:(tp + 1) * h] for s in stats)
            whole = kv_qparams(k_min.min(0, keepdim=True)[0], k_max.max(0, keepdim=True)[0],
                               v_min.min(0, keepdim=True)[0], v_max.max(0, keepdim=True)[0], symmetric)
            arrays[scale_file_name(layer, tp)] = whole.reshape(-1).numpy()
            if per_head:
                arrays[scale_file_name(layer, tp, True)] = kv_qparams(
                    k_min, k_max, v_min, v_max, symmetric).numpy()
    return arrays


def stale_per_head_files(output_dir: str, arrays: Dict[str, np.ndarray]) -> List[str]:
    """Per-head files in `output_dir` that a new set without them would leave out of date."""
    if not osp.isdir(output_dir):
        return []
    return sorted(f for f in os.listdir(output_dir) if PER_HEAD_PATTERN.match(f) and f not in arrays)


def write_scale_files(output_dir: str, arrays: Dict[str, np.ndarray], remove: Iterable[str] = ()
                      ) -> List[str]:
    """Write every array as `output_dir/name` (little-endian float32), then delete `remove`.

    All files are written to temporary names first and renamed only when all are complete; on
    an error the temporary files, the files this call already renamed and the folders it
    created are removed. Returns the paths written.
    """
    created = None
    probe = osp.abspath(output_dir)
    while not osp.exists(probe):
        created, probe = probe, osp.dirname(probe)
    os.makedirs(output_dir, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    temps: Dict[str, str] = {}
    placed: List[str] = []
    try:
        for name, array in arrays.items():
            fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=output_dir)
            temps[name] = tmp
            with os.fdopen(fd, 'wb') as f:
                f.write(np.ascontiguousarray(array, dtype='<f4').tobytes())
            os.chmod(tmp, 0o666 & ~umask)
        for name, tmp in temps.items():
            dst = osp.join(output_dir, name)
            os.replace(tmp, dst)
            placed.append(dst)
    except BaseException:
        for path in [*temps.values(), *placed]:
            if osp.exists(path):
                os.remove(path)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    for name in remove:
        path = osp.join(output_dir, name)
        if osp.exists(path):
            os.remove(path)
    return placed


def read_scale_file(path: str) -> np.ndarray:
    """A scale file's float32 values (flat; a per-head file is [rows, h] row-major)."""
    return np.fromfile(path, dtype='<f4')
