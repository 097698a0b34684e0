"""Canonical tensors -> the engine's weight files: the layout transforms, the output file plan
(`build_jobs`) and the `Writer` that writes raw fp16 files on background threads.

Layouts (v0.0.2's, see the behaviour reference, section 3): every matrix is written transposed
to [in, out]; q/k rows are in interleaved rotary-pair order; rank r of `--tp N` gets
`w_qkv.r` = [in, q_r | k_r | v_r], `wo.r` = rows r of wo^T, `w1.r`/`w3.r` = columns r and
`w2.r` = rows r of their transposes; biases of wo and every norm are whole on every rank.
"""
import math
import os.path as osp
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Union

from lmdeploy.serve.turbomind.common import ModelInfo, shape_str

if TYPE_CHECKING:  # torch/numpy are imported on first use: `--help` and early errors stay fast
    import numpy as np
    import torch

# Reused per-thread conversion buffers up to this size; larger outputs get a one-off buffer.
SCRATCH_CAP_BYTES = 256 * 2**20

# --------------------------------------------------------------------------------------------
# Layout transforms (views; the one copy of each output happens when it is written)


def interleave_rows(x: 'torch.Tensor', n_heads: int, head_dim: int) -> 'torch.Tensor':
    """q/k (weight [out, in] or bias [out]) with HF's rotate-half rows put in interleaved-pair
    order: within a head, HF row j < d/2 goes to 2j and row d/2 + j to 2j+1.

    Returned as a view of shape [n_heads, d/2, 2, *rest] (no copy); flattening the first three
    dims gives the permuted [out, *rest] tensor. Dim 0 counts heads, so slicing it by `tp`
    selects a rank's rows just as slicing the flat tensor would."""
    rest = x.shape[1:]
    return x.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2)


class Fused:
    """Rank r's fused q|k|v: `cat(parts, 0).t()` for weights ([in, q_r + k_r + v_r]) or
    `cat(parts)` for biases, made only when written, straight into a reused buffer.

    Each part holds whole rows of `width` elements (weights) or single values (biases, width
    None); its leading dims may be a view such as `interleave_rows`'s."""

    def __init__(self, parts: Sequence['torch.Tensor'], width: Optional[int]):
        self.parts, self.width = list(parts), width
        n = sum(p.numel() for p in self.parts)
        self.shape = (width, n // width) if width else (n, )

    def materialize(self, scratch: '_Scratch') -> 'torch.Tensor':
        rows_shape = (self.shape[1], self.width) if self.width else self.shape
        rows = scratch.get('rows' if self.width else 'out', rows_shape)
        start = 0
        for p in self.parts:
            n = p.numel() // (self.width or 1)
            rows[start:start + n].view(p.shape).copy_(p)
            start += n
        if not self.width:
            return rows
        return scratch.get('out', self.shape).copy_(rows.t())


def merge_qkv_rank(q: 'torch.Tensor', k: 'torch.Tensor', v: 'torch.Tensor', tp: int,
                   rank: int) -> Fused:
    """Rank `rank`'s fused [in, q_r | k_r | v_r] slice from [out, in] q/k/v (or [out] biases);
    q/k may be `interleave_rows` views."""
    parts = []
    for x in (q, k, v):
        n = x.shape[0] // tp
        parts.append(x[rank * n:(rank + 1) * n])
    return Fused(parts, v.shape[-1] if v.dim() == 2 else None)


# --------------------------------------------------------------------------------------------
# Writing


class _Scratch(threading.local):
    """Per-thread fp16 buffers, grown as needed and reused from file to file (fresh memory
    costs page faults on every first touch)."""

    def __init__(self):
        self.bufs: Dict[str, 'torch.Tensor'] = {}

    def get(self, key: str, shape) -> 'torch.Tensor':
        import torch
        n = math.prod(shape)
        if 2 * n > SCRATCH_CAP_BYTES:
            return torch.empty(shape, dtype=torch.float16)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.empty(n, dtype=torch.float16)
        return buf[:n].view(shape)


def as_fp16_array(x: Union['torch.Tensor', Fused], scratch: _Scratch) -> 'np.ndarray':
    """x as a C-contiguous fp16 numpy array: x's own memory when it already is one, else one
    converting/transposing copy into a scratch buffer."""
    import numpy as np
    import torch
    if isinstance(x, Fused):
        t = x.materialize(scratch)
    else:
        t = x.detach()
        if t.dtype != torch.float16 or not t.is_contiguous():
            t = scratch.get('out', t.shape).copy_(t)
    return np.ascontiguousarray(t.numpy())


def write_raw(path: str, arr: 'np.ndarray'):
    """The array's bytes, no header (what numpy's tofile writes)."""
    import numpy as np
    data = memoryview(arr.reshape(-1).view(np.uint8))
    with open(path, 'wb', buffering=0) as f:
        while data:
            data = data[f.write(data):]


class Writer:
    """Writes raw fp16 tensor files (no header) into the weights directory.

    `save` runs on the caller's thread: it prints (`verbose`), counts, and queues the work (the
    dtype conversion or transposing copy, then the write) for `threads` background threads,
    with at most `queue` files waiting, so that reading overlaps writing and memory stays
    bounded. Use it as a context manager: a normal exit waits for every file and raises the
    first write error; an exit on an error drops the waiting files and waits for the running
    ones, so nothing writes into the workspace after the caller has moved on."""

    def __init__(self, out_dir: str, verbose: bool = False, threads: int = 2, queue: int = 2):
        self.out_dir = out_dir
        self.verbose = verbose
        self.nbytes = 0
        self.nfiles = 0
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix='deploy-writer')
        self._slots = threading.BoundedSemaphore(max(1, threads) + max(0, queue))
        self._scratch = _Scratch()
        self._error: Optional[BaseException] = None

    def save(self, name: str, x: Union['torch.Tensor', Fused]):
        if self.verbose:
            print(name, shape_str(x.shape))
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            raise self._error
        path = osp.join(self.out_dir, name)
        fut = self._pool.submit(self._write, path, x)
        fut.add_done_callback(self._done)
        self.nbytes += 2 * math.prod(x.shape)
        self.nfiles += 1

    def _write(self, path: str, x):
        write_raw(path, as_fp16_array(x, self._scratch))

    def _done(self, fut: Future):
        if not fut.cancelled() and fut.exception() is not None and self._error is None:
            self._error = fut.exception()
        self._slots.release()

    def split(self, name: str, x: 'torch.Tensor', dim: int, tp: int):
        """`<prefix>.<rank>.<ext>` files: x split evenly along `dim`."""
        import torch
        prefix, ext = osp.splitext(name)
        for r, part in enumerate(torch.chunk(x, tp, dim=dim)):
            self.save(f'{prefix}.{r}{ext}', part)

    def replicate(self, name: str, x: 'torch.Tensor', tp: int):
        prefix, ext = osp.splitext(name)
        for r in range(tp):
            self.save(f'{prefix}.{r}{ext}', x)

    def close(self, cancel: bool = False):
        """Wait for the queued files (or drop them when `cancel`); raise the first error."""
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        if not cancel and self._error is not None:
            raise self._error

    def __enter__(self) -> 'Writer':
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(cancel=exc_type is not None)


# --------------------------------------------------------------------------------------------
# The output files


@dataclass
class Job:
    """One group of output files, written once all its canonical inputs are available."""
    inputs: List[str]
    run: Callable[[Dict[str, 'torch.Tensor']], None]


def build_jobs(info: ModelInfo, tp: int, w: Writer, extra: Sequence[str] = ()) -> List[Job]:
    jobs: List[Job] = []

    def whole(cname):
        jobs.append(Job([cname], lambda t, c=cname: w.save(c, t[c])))

    for i in range(info.num_layer):
        p = f'layers.{i}.attention'
        qkv = [f'{p}.w{c}.weight' for c in 'qkv']
        qkv_b = [f'{p}.w{c}.bias' for c in 'qkv']

        def run_qkv(t, p=p, qkv=qkv, qkv_b=qkv_b):
            for r in range(tp):
                w.save(f'{p}.w_qkv.{r}.weight', merge_qkv_rank(*(t[c] for c in qkv), tp, r))
            if info.attn_bias:
                for r in range(tp):
                    w.save(f'{p}.w_qkv.{r}.bias', merge_qkv_rank(*(t[c] for c in qkv_b), tp, r))

        jobs.append(Job(qkv + (qkv_b if info.attn_bias else []), run_qkv))

        def run_wo(t, p=p):
            w.split(f'{p}.wo.weight', t[f'{p}.wo.weight'].t(), 0, tp)
            if info.attn_bias:
                w.replicate(f'{p}.wo.bias', t[f'{p}.wo.bias'], tp)

        jobs.append(Job([f'{p}.wo.weight'] + ([f'{p}.wo.bias'] if info.attn_bias else []), run_wo))

        f = f'layers.{i}.feed_forward'
        for key, dim in (('w1', -1), ('w3', -1), ('w2', 0)):
            name = f'{f}.{key}.weight'
            jobs.append(Job([name], lambda t, n=name, d=dim: w.split(n, t[n].t(), d, tp)))
        whole(f'layers.{i}.attention_norm.weight')
        whole(f'layers.{i}.ffn_norm.weight')
    for name in ('tok_embeddings.weight', 'norm.weight', 'output.weight', *extra):
        whole(name)
    return jobs
