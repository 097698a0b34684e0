"""Load one tensor-parallel rank's weights from a workspace (`triton_models/weights/`).

The files are the ones LMDeploy v0.0.2's deploy.py writes (behaviour reference section 3.2):
raw little-endian arrays of `weight_type` (fp16) with no header, linear weights as
``[in, out]``, q/k columns in interleaved-rotary order, fused per rank as ``[q_r | k_r | v_r]``.

``load_weights(cfg, rank, tp)`` is a pure function of (config, rank, tp):

* ``tp == cfg.tensor_para_size`` (the workspace's split): rank r reads its ``.{r}.`` files;
* any other ``tp`` that divides the heads, KV heads and FFN width: every on-disk rank file of a
  tensor is read, the full tensor rebuilt, and this rank's slice cut from it.

Unlike v0.0.2 (which logged a warning and kept random weights), a missing file or a file whose
size is not exactly the expected element count is an error naming the file and both sizes.
One exception, as in v0.0.2: ``tok_embeddings`` and ``output`` may hold more than
``vocab_size`` rows (v0.0.2 wrote the sentencepiece vocab size, which can be below the
embedding rows); the first ``vocab_size`` rows are used, and the file must still be whole rows.

Tensors kept in memory (engine dtype, on `device`):

    tok_embeddings [V, H]        norm [H]        output [V/tp, H]  (this rank's vocab rows; both
                                                 files are whole on disk, as v0.0.2 wrote them)
    per layer:  attention_norm [H], ffn_norm [H]
                w_qkv [H, (hq + 2*hkv) * D]      columns q | k | v of this rank's heads
                b_qkv [(hq + 2*hkv) * D] | None
                wo    [hq * D, H]                b_o [H] | None (replicated; added once, after
                                                                 the all-reduce)
                w13   [H, 2 * I/tp]              w1 (gate) | w3 (up), fused for one GEMM
                w2    [I/tp, H]
"""
import os
import os.path as osp
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from .config import EngineConfig


class WeightError(RuntimeError):
    """A missing or wrongly sized weight file; the message names the file and the sizes."""


@dataclass
class LayerWeights:
    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: Optional[torch.Tensor]
    wo: torch.Tensor
    b_o: Optional[torch.Tensor]
    w13: torch.Tensor
    w2: torch.Tensor


@dataclass
class ModelWeights:
    tok_embeddings: torch.Tensor
    norm: torch.Tensor
    output: torch.Tensor
    layers: List[LayerWeights]
    rank: int = 0
    tp: int = 1

    def nbytes(self) -> int:
        total = 0
        for t in (self.tok_embeddings, self.norm, self.output):
            total += t.numel() * t.element_size()
        for layer in self.layers:
            for t in vars(layer).values():
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


_NP_TYPES = {'fp16': np.float16, 'fp32': np.float32}


def read_raw(path: str, shape, weight_type: str = 'fp16') -> torch.Tensor:
    """One raw file as a CPU tensor of `shape` (in the file's dtype); strict about its size."""
    np_type = _NP_TYPES[weight_type]
    itemsize = np.dtype(np_type).itemsize
    expected = int(np.prod(shape))
    if not osp.isfile(path):
        raise WeightError(f'weight file {path} is missing (expected {expected} {weight_type} '
                          f'elements for shape {tuple(shape)}); re-run deploy')
    size = os.path.getsize(path)
    if size != expected * itemsize:
        raise WeightError(f'weight file {path} has {size} bytes ({size / itemsize:g} '
                          f'{weight_type} elements) but shape {tuple(shape)} needs {expected} '
                          f'elements ({expected * itemsize} bytes)')
    arr = np.fromfile(path, dtype=np_type, count=expected)
    return torch.from_numpy(arr).reshape(tuple(shape))


def read_vocab_rows(path: str, vocab_size: int, hidden: int, weight_type: str = 'fp16'
                    ) -> torch.Tensor:
    """The first `vocab_size` rows of a ``[rows, hidden]`` embedding / LM-head file.

    LMDeploy v0.0.2 wrote config.ini's ``vocab_size`` from the sentencepiece model, which can be
    smaller than the checkpoint's embedding rows (padded vocabularies), and its engine read only
    the first ``vocab_size`` rows. So a file with more rows is accepted when its size is a whole
    number of rows; fewer rows, or a partial row, is an error.
    """
    np_type = _NP_TYPES[weight_type]
    itemsize = np.dtype(np_type).itemsize
    if not osp.isfile(path):
        raise WeightError(f'weight file {path} is missing (expected {vocab_size * hidden} '
                          f'{weight_type} elements for shape {(vocab_size, hidden)}); re-run '
                          'deploy')
    size = os.path.getsize(path)
    row_bytes = hidden * itemsize
    if size % row_bytes or size < vocab_size * row_bytes:
        raise WeightError(f'weight file {path} has {size} bytes ({size / itemsize:g} '
                          f'{weight_type} elements) but needs at least vocab_size {vocab_size} '
                          f'whole rows of hidden size {hidden} ({vocab_size * row_bytes} bytes, '
                          f'a multiple of {row_bytes})')
    arr = np.fromfile(path, dtype=np_type, count=vocab_size * hidden)
    return torch.from_numpy(arr).reshape(vocab_size, hidden)


class _Reader:

    def __init__(self, cfg: EngineConfig, rank: int, tp: int, device, dtype):
        self.cfg, self.rank, self.tp = cfg, rank, tp
        self.disk_tp = cfg.tensor_para_size
        self.dir = cfg.weight_dir
        self.device, self.dtype = device, dtype

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype).contiguous()

    def whole(self, name: str, shape) -> torch.Tensor:
        return self._out(read_raw(osp.join(self.dir, name), shape, self.cfg.weight_type))

    def vocab_rows(self, name: str, this_rank: bool = False) -> torch.Tensor:
        """[vocab_size, H]: the first vocab_size rows of a possibly longer file (v0.0.2);
        with `this_rank`, only this rank's [V/tp, H] slice of them (the LM head)."""
        rows = read_vocab_rows(osp.join(self.dir, name), self.cfg.vocab_size,
                               self.cfg.hidden_size, self.cfg.weight_type)
        if this_rank:
            rows = torch.chunk(rows, self.tp, dim=0)[self.rank]
        return self._out(rows)

    def _disk(self, prefix: str, ext: str, r: int, shape) -> torch.Tensor:
        return read_raw(osp.join(self.dir, f'{prefix}.{r}.{ext}'), shape, self.cfg.weight_type)

    def split(self, prefix: str, ext: str, full_shape, dim: int) -> torch.Tensor:
        """A tensor split evenly along `dim` on disk; returns this rank's runtime slice."""
        dim = dim % len(full_shape)

        def part_shape(n):
            s = list(full_shape)
            s[dim] //= n
            return s

        if self.tp == self.disk_tp:
            return self._out(self._disk(prefix, ext, self.rank, part_shape(self.tp)))
        parts = [self._disk(prefix, ext, r, part_shape(self.disk_tp))
                 for r in range(self.disk_tp)]
        full = torch.cat(parts, dim=dim)
        return self._out(torch.chunk(full, self.tp, dim=dim)[self.rank])

    def replicated(self, prefix: str, ext: str, shape) -> torch.Tensor:
        r = self.rank if self.tp == self.disk_tp else 0
        return self._out(self._disk(prefix, ext, r, shape))

    def qkv(self, prefix: str, ext: str) -> torch.Tensor:
        """Fused [(H,) q_r | k_r | v_r] of this rank, re-split when tp differs from disk."""
        cfg = self.cfg
        H, qd, kvd = cfg.hidden_size, cfg.q_dim, cfg.kv_dim
        lead = [H] if ext == 'weight' else []
        if self.tp == self.disk_tp:
            width = (qd + 2 * kvd) // self.tp
            return self._out(self._disk(prefix, ext, self.rank, lead + [width]))
        n = self.disk_tp
        qs, ks, vs = [], [], []
        for r in range(n):
            x = self._disk(prefix, ext, r, lead + [(qd + 2 * kvd) // n])
            q, k, v = torch.split(x, [qd // n, kvd // n, kvd // n], dim=-1)
            qs.append(q), ks.append(k), vs.append(v)
        q, k, v = (torch.cat(p, dim=-1) for p in (qs, ks, vs))
        mine = [torch.chunk(t, self.tp, dim=-1)[self.rank] for t in (q, k, v)]
        return self._out(torch.cat(mine, dim=-1))


def load_weights(cfg: EngineConfig, rank: int = 0, tp: Optional[int] = None, device=None,
                 dtype: Optional[torch.dtype] = None) -> ModelWeights:
    """Rank `rank` of `tp` (default: the workspace's tensor_para_size), in `dtype` (default
    cfg's) on `device` (default cfg's)."""
    tp = cfg.tensor_para_size if tp is None else int(tp)
    if not 0 <= rank < tp:
        raise ValueError(f'rank {rank} out of range for tp={tp}')
    for key in ('head_num', 'kv_head_num', 'inter_size', 'vocab_size'):
        if getattr(cfg, key) % tp:
            raise WeightError(f'tp={tp} does not divide {key} {getattr(cfg, key)}')
    if not cfg.weight_dir or not osp.isdir(cfg.weight_dir):
        raise WeightError(f'weight directory {cfg.weight_dir!r} does not exist')
    device = torch.device(device if device is not None else cfg.device)
    dtype = dtype if dtype is not None else cfg.torch_dtype
    rd = _Reader(cfg, rank, tp, device, dtype)
    H, I, qd = cfg.hidden_size, cfg.inter_size, cfg.q_dim
    layers = []
    for i in range(cfg.num_layer):
        a, f = f'layers.{i}.attention', f'layers.{i}.feed_forward'
        w1 = rd.split(f'{f}.w1', 'weight', [H, I], -1)
        w3 = rd.split(f'{f}.w3', 'weight', [H, I], -1)
        layers.append(LayerWeights(
            attention_norm=rd.whole(f'layers.{i}.attention_norm.weight', [H]),
            ffn_norm=rd.whole(f'layers.{i}.ffn_norm.weight', [H]),
            w_qkv=rd.qkv(f'{a}.w_qkv', 'weight'),
            b_qkv=rd.qkv(f'{a}.w_qkv', 'bias') if cfg.attn_bias else None,
            wo=rd.split(f'{a}.wo', 'weight', [qd, H], 0),
            b_o=rd.replicated(f'{a}.wo', 'bias', [H]) if cfg.attn_bias else None,
            w13=torch.cat([w1, w3], dim=-1).contiguous(),
            w2=rd.split(f'{f}.w2', 'weight', [I, H], 0),
        ))
        del w1, w3
    return ModelWeights(tok_embeddings=rd.vocab_rows('tok_embeddings.weight'),
                        norm=rd.whole('norm.weight', [H]),
                        output=rd.vocab_rows('output.weight', this_rank=True), layers=layers,
                        rank=rank, tp=tp)
