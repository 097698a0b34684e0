"""Reading source checkpoints for `deploy`, one shard at a time.

Two layouts are understood:

* HuggingFace: `model.safetensors` / `model-0000X-of-0000N.safetensors` (with or without
  `model.safetensors.index.json`), or `pytorch_model.bin` / `pytorch_model-0000X-of-0000N.bin`
  (with or without `pytorch_model.bin.index.json`). safetensors is preferred when both exist.
* Meta: `consolidated.XX.pth` model-parallel shards (`*.pth`, then `*.pt`, each sorted).

A `Shard` opens lazily: safetensors through `safe_open` (tensors are memory-mapped views),
`.bin` and `.pth` through `torch.load(mmap=True)` so a tensor's bytes are only paged in when
used. Old pickle-only files that cannot be memory-mapped fall back to a plain load of that one
shard. An open memory-mapped shard costs no memory until its tensors are read, so a caller may
keep it open between a scan of its names/shapes and the conversion (`Shard.mapped`).

Every failure is raised as `CheckpointError` with a one-line message naming the file.
"""
from __future__ import annotations

import json
import os
import re
import os.path as osp
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported on first use: `--help` and early errors stay fast
    import torch

SAFETENSORS_INDEX = 'model.safetensors.index.json'
BIN_INDEX = 'pytorch_model.bin.index.json'
# `*.bin` files that are never weights.
_NOT_WEIGHTS = {'training_args.bin', 'optimizer.bin', 'scheduler.bin'}


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message is one line."""


def one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split())
    if 'Weights only load failed' in text:
        # torch's advice to retry with weights_only=False is not for us: the file holds
        # something other than tensors (or is not a checkpoint at all).
        m = re.search(r'WeightsUnpickler error: (.*?)(?: Check the documentation|$)', text)
        return 'not a plain tensor checkpoint' + (f' ({m.group(1).strip()})' if m else '')
    if isinstance(e, OSError) and 'Invalid argument' in text:
        return f'truncated or not a checkpoint ({text})'
    return text or type(e).__name__


class Shard:
    """One weight file. `names()`/`shape()` are cheap; `get()` reads one tensor."""

    def __init__(self, path: str):
        self.path = path
        self._st = None  # safetensors handle
        self._sd: Optional[Dict[str, torch.Tensor]] = None  # torch.load result
        self._mapped = False  # the open tensors are memory-mapped views of the file

    @property
    def is_safetensors(self) -> bool:
        return self.path.endswith('.safetensors')

    @property
    def is_open(self) -> bool:
        return self._st is not None or self._sd is not None

    @property
    def mapped(self) -> bool:
        """Open, and holding no tensor data in memory until a tensor is read."""
        return self.is_open and self._mapped

    def open(self) -> 'Shard':
        if self.is_open:
            return self
        try:
            if self.is_safetensors:
                from safetensors import safe_open
                self._st = safe_open(self.path, framework='pt')
                self._mapped = True
            else:
                self._sd, self._mapped = _torch_load(self.path)
        except CheckpointError:
            raise
        except Exception as e:  # corrupt, truncated, not a checkpoint at all
            raise CheckpointError(f'cannot read shard {self.path}: {one_line(e)}') from None
        return self

    def close(self):
        self._st = None
        self._sd = None
        self._mapped = False

    def names(self) -> List[str]:
        self.open()
        if self._st is not None:
            return list(self._st.keys())
        return list(self._sd.keys())

    def shape(self, name: str) -> Tuple[int, ...]:
        self.open()
        try:
            if self._st is not None:
                return tuple(self._st.get_slice(name).get_shape())
            return tuple(self._sd[name].shape)
        except Exception as e:
            raise self._tensor_error(name, e) from None

    def _tensor_error(self, name: str, e: BaseException) -> CheckpointError:
        return CheckpointError(f'cannot read tensor {name} from {self.path}: {one_line(e)}')

    def get(self, name: str) -> torch.Tensor:
        self.open()
        try:
            if self._st is not None:
                return self._st.get_tensor(name)
            return self._sd[name]
        except Exception as e:
            raise self._tensor_error(name, e) from None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


def _torch_load(path: str) -> Tuple[Dict[str, torch.Tensor], bool]:
    """(tensors by name, whether they are memory-mapped)."""
    import torch
    mapped = True
    try:
        sd = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    except RuntimeError as e:
        # Legacy (non-zip) serialisation cannot be memory-mapped: load this one file whole.
        if 'mmap' not in str(e) and 'zip' not in str(e):
            raise
        sd = torch.load(path, map_location='cpu', weights_only=True)
        mapped = False
    if isinstance(sd, dict) and 'state_dict' in sd and isinstance(sd['state_dict'], dict):
        sd = sd['state_dict']
    if not isinstance(sd, dict):
        raise CheckpointError(f'cannot read shard {path}: it holds a {type(sd).__name__}, '
                              'not a dict of tensors')
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, mapped


def _read_index(path: str) -> List[str]:
    try:
        with open(path) as f:
            weight_map = json.load(f)['weight_map']
        files = []
        for fname in weight_map.values():
            if fname not in files:
                files.append(fname)
    except Exception as e:
        raise CheckpointError(f'cannot read index {path}: {one_line(e)}') from None
    return sorted(files)


def find_hf_shards(model_path: str) -> List[Shard]:
    """The weight files of an HF checkpoint directory, in reading order."""
    entries = sorted(os.listdir(model_path))
    for index, ext in ((SAFETENSORS_INDEX, '.safetensors'), (BIN_INDEX, '.bin')):
        files: Sequence[str] = []
        index_path = osp.join(model_path, index)
        if osp.isfile(index_path):
            files = _read_index(index_path)
            for fname in files:
                if not osp.isfile(osp.join(model_path, fname)):
                    raise CheckpointError(f'shard {fname} listed in {index_path} does not exist')
        else:
            files = [e for e in entries if e.endswith(ext) and e not in _NOT_WEIGHTS
                     and osp.isfile(osp.join(model_path, e))]
        if files:
            return [Shard(osp.join(model_path, fname)) for fname in files]
    raise CheckpointError(f'no weight files (*.safetensors or *.bin) in {model_path}')


def find_meta_shards(model_path: str) -> List[Shard]:
    """Meta model-parallel shards: `*.pth` then `*.pt`, each sorted (v0.0.2's order)."""
    entries = sorted(os.listdir(model_path))
    files = [e for e in entries if e.endswith('.pth')] + [e for e in entries if e.endswith('.pt')]
    if not files:
        raise CheckpointError(f'no Meta checkpoint shards (*.pth) in {model_path}')
    return [Shard(osp.join(model_path, e)) for e in files]


def iter_shards(shards: Sequence[Shard]) -> Iterator[Shard]:
    """Open each shard in turn (or use it as already opened) and close it before the next."""
    for shard in shards:
        with shard:
            yield shard
