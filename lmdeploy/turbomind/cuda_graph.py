"""CUDA graphs for steps whose launches would cost more host time than their device work.
Eager launches of a 7B forward cost ~20 ms of host time (~450 kernels), far more than a small
step's GPU time; a replay costs one host-to-device copy plus the replay.

Two kinds of graphs, each the whole model forward over one static int64 buffer:

    packed = input_ids[T] | positions[T] | slot_mapping[T] | kv_lens[R] | sample_idx[S]
             | cu_seqlens[R + 1] | block_table[R, W]     (W = ceil(session_len / block_size))

sliced (and cast to int32 where the kernels want it) inside the graph:

* Decode graphs (R = T = S = bucket, one per batch-size bucket): rows B..bucket-1 are padding:
  token 0 at position 0, slot -1 (store_kv skips it), kv_len 1 over whatever block id is in the
  table row (only read; every value there is a valid pool block: zeros at start, later earlier
  rows' first blocks); their logits are dropped. cu_seqlens and sample_idx are aranges.
* Varlen graphs (T tokens, R rows, S = R samples): any mix of decode rows, prompts and prompt
  chunks over cached prefixes with at most T tokens and R - 1 rows. One-row prompt graphs
  (R = 2, T = 16..512) serve a lone prompt; mixed graphs (R = min(T, max_batch_size) + 1,
  T = 32..1024) serve steps where prompts join decoding rows, and lone prompts of 513..1024
  tokens (larger steps are GPU-bound and run eagerly). The real rows come first;
  the T - n padding tokens form one extra row (kv_len = its length, slot -1 so nothing is
  written, its table row points at block 0, which it only reads; it attends to nothing but
  itself); the rows after it are empty (q_len 0, kv_len 0: every attention program of theirs
  returns at once). Rows are independent, so the real rows' logits equal an eager forward's.

Input ids may be placeholders for the previous step's sampled tokens (step_input.py): every
graph resolves them from `CudaGraphs.prev_tokens`, a static device buffer the replay copies the
step's `prev_tokens` into.

Attention's decode split count is a host-side launch parameter: graphs are captured with the
hint ``max_kv_len = capture_kv_len`` (session_len), valid for any kv_lens up to it. The eager
path uses the same hint for decode-only steps (ModelRunner), so graphs on and off run the same
partitions. All graphs share one memory pool (captured largest first); only each graph's output
logits stay allocated between replays.
"""
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .step_input import StepInput

logger = logging.getLogger('lmdeploy.turbomind')


def default_buckets(max_batch_size: int) -> List[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, ... capped at max_batch_size (always
    included)."""
    out, b = [], 1
    while b < 16:
        out.append(b)
        b *= 2
    b = 16
    while b < max_batch_size:
        out.append(b)
        b += 8 if b < 32 else 16 if b < 64 else 32
    out = [x for x in out if x < max_batch_size] + [max_batch_size]
    return sorted(set(out))


def prompt_buckets(max_tokens: int) -> List[int]:
    """Token buckets of the one-row prompt graphs: 16, 32, ..., up to min(512, max_tokens).
    Longer lone prompts are GPU-bound: eager launches cost nothing there."""
    out, t = [], 16
    while t <= min(512, max_tokens):
        out.append(t)
        t *= 2
    return out


# Mixed graphs up to this many tokens. A larger step is GPU-bound: its eager launches (20-29 ms
# of host time for a 7B model, ~45 us a kernel on the H100 machines of session 6) hide behind
# its device time (a 1024-token prompt's GEMMs alone are ~22 ms), while a graph pads it to a
# bucket. Below, a step with few decode rows is host-bound when eager: 4 decode rows and a
# 512-token prompt ran 29.1 ms against an 11.5 ms kernel sum (benchmark/NOTES.md, session 6);
# with many rows the device time grows (148 rows / 556 tokens: eager 26.7 ms, a graph padded
# to 640 tokens 29.4, session 3: hence buckets 64 tokens apart).
MAX_MIXED_TOKENS = 1024


def mixed_buckets(max_tokens: int, limit: int = MAX_MIXED_TOKENS) -> List[int]:
    """Token buckets of the mixed graphs: 32, 64, 96, 128, 160, 192, then steps of 64 up to
    min(MAX_MIXED_TOKENS, max_tokens) rounded up to a bucket (padding costs its tokens' GEMM
    time); none above `limit` (the padding row's KV must fit one block-table row: at most
    W * block_size tokens)."""
    top = min(MAX_MIXED_TOKENS, limit, max(32, max_tokens))
    out, t = [], 32
    while t <= limit:
        out.append(t)
        if t >= top:
            break
        t += 32 if t < 192 else 64
    return out


def varlen_shapes(prompt_buckets: List[int], mixed_buckets: List[int],
                  max_batch_size: int) -> List[Tuple[int, int]]:
    """(rows, tokens) of every varlen graph, smallest first: (2, t) per prompt bucket and
    (min(t, max_batch_size) + 1, t) per mixed bucket. rows never equals tokens: the attention
    kernels take T == B to mean a decode-only step."""
    shapes = {(2, t) for t in prompt_buckets}
    for t in mixed_buckets:
        rows = min(t, max_batch_size) + 1
        shapes.add((rows + 1 if rows == t else rows, t))
    return sorted(shapes, key=lambda rt: (rt[1], rt[0]))


class PackedLayout:
    """Where a graph's inputs live in its packed int64 buffer, and how a step is staged into
    it (padding as the module doc says). Host-only numpy work: tests run it on CPU."""

    def __init__(self, rows: int, tokens: int, decode: bool, width: int, block_size: int):
        self.rows, self.tokens, self.width, self.block_size = rows, tokens, width, block_size
        self.is_decode = decode
        R, T = rows, tokens
        assert decode or T <= width * block_size, 'the padding row must fit a table row'
        self.offsets = np.cumsum([0, T, T, T, R, R, R + 1, R * width]).tolist()
        self.size = self.offsets[-1]

    def views(self, buf):
        """(input_ids, positions, slot_mapping, kv_lens, sample_idx, cu_seqlens, block_table)
        of `buf` (numpy array or tensor)."""
        o = self.offsets
        parts = [buf[o[i]:o[i + 1]] for i in range(7)]
        parts[6] = parts[6].reshape(self.rows, self.width)
        return parts

    def initial(self) -> np.ndarray:
        """The buffer the graph is captured over: all padding (decode: `rows` rows of one
        token; varlen: one row of all `tokens` tokens)."""
        buf = np.zeros(self.size, dtype=np.int64)
        ids, pos, slots, kvl, sidx, cu, _ = self.views(buf)
        slots[:] = -1
        if self.is_decode:
            kvl[:] = 1
            cu[:] = np.arange(self.rows + 1)
            sidx[:] = np.arange(self.rows)
        else:
            kvl[0] = self.tokens
            cu[1:] = self.tokens
            pos[:] = np.arange(self.tokens)
        return buf

    def fits(self, step: StepInput) -> bool:
        B, n, S = step.batch_size, step.num_tokens, step.sample_idx.shape[0]
        if self.is_decode:
            return n == B <= self.rows and S == B
        pad_row = 1 if n < self.tokens else 0
        return n <= self.tokens and B + pad_row <= self.rows and S <= self.rows

    def stage(self, step: StepInput, buf: np.ndarray):
        """Write the host-side `step` (which `fits`) into `buf`."""
        B, n, S = step.batch_size, step.num_tokens, step.sample_idx.shape[0]
        ids, pos, slots, kvl, sidx, cu, table = self.views(buf)
        ids[:n] = step.input_ids.numpy()
        pos[:n] = step.positions.numpy()
        slots[:n] = step.slot_mapping.numpy()
        kvl[:B] = step.kv_lens.numpy()
        table[:B, :step.block_table.shape[1]] = step.block_table.numpy()
        pad = self.tokens - n
        if pad:
            ids[n:] = 0
            pos[n:] = np.arange(pad)
            slots[n:] = -1
        if self.is_decode:
            kvl[B:] = 1
            return
        sidx[:S] = step.sample_idx.numpy()
        sidx[S:] = 0
        cu[:B + 1] = step.cu_seqlens.numpy()
        cu[B + 1:] = self.tokens
        kvl[B:] = 0
        if pad:  # row B: the padding tokens, over block 0 (read only)
            kvl[B] = pad
            table[B, :-(-pad // self.block_size)] = 0

    def step_input(self, buf: torch.Tensor, capture_kv_len: int,
                   prev_tokens: Optional[torch.Tensor]) -> StepInput:
        """The StepInput over the packed tensor `buf` (the slices and casts are captured)."""
        ids, pos, slots, kvl, sidx, cu, table = self.views(buf)
        return StepInput(input_ids=ids, positions=pos, cu_seqlens=cu.to(torch.int32),
                         kv_lens=kvl.to(torch.int32), block_table=table.to(torch.int32),
                         slot_mapping=slots, sample_idx=sidx,
                         max_q_len=1 if self.is_decode else self.tokens,
                         max_kv_len=capture_kv_len,
                         num_decode=self.rows if self.is_decode else 0,
                         prev_tokens=prev_tokens)


class _Graph:
    """One captured forward over a `PackedLayout`: a pinned staging buffer, its device copy,
    the graph and its output logits ([rows, V] fp32)."""

    def __init__(self, layout: PackedLayout, device):
        self.layout = layout
        self.host = torch.from_numpy(layout.initial()).pin_memory()
        self.packed = self.host.to(device)
        self.host_np = self.host.numpy()
        self.copy_done = torch.cuda.Event()
        self.copy_pending = False
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None

    def load(self, step: StepInput):
        """Stage `step` and copy it to the device in one copy from pinned memory."""
        if self.copy_pending:  # the previous copy from the staging buffer must be done
            self.copy_done.synchronize()
        self.layout.stage(step, self.host_np)
        self.packed.copy_(self.host, non_blocking=True)
        self.copy_done.record()
        self.copy_pending = True


class CudaGraphs:
    """Captured graphs of one runner. `run(step)` replays the smallest graph that fits the
    step, or returns None (the caller runs eagerly)."""

    def __init__(self, model, kv_cache, width: int, capture_kv_len: int, device,
                 buckets: List[int], prompt_buckets: List[int] = (),
                 mixed_buckets: List[int] = (), max_batch_size: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.width = width
        self.block_size = kv_cache.block_size
        self.capture_kv_len = capture_kv_len
        self.device = device
        self.buckets = sorted(set(int(b) for b in buckets if b > 0))
        self.prompt_buckets = sorted(set(int(t) for t in prompt_buckets if t > 1))
        self.mixed_buckets = sorted(set(int(t) for t in mixed_buckets if t > 1))
        self.shapes = varlen_shapes(self.prompt_buckets, self.mixed_buckets,
                                    max_batch_size or max(self.buckets, default=1))
        self.graphs: Dict[int, _Graph] = {}
        self.varlen_graphs: List[_Graph] = []
        most = max([0] + self.buckets + [r for r, _ in self.shapes])
        self.prev_tokens = torch.zeros(max(1, most), dtype=torch.long, device=device)
        self.pool = None
        self.memory_bytes = 0
        self.replays = 0  # decode-only steps that ran from a graph (tests check the path)
        self.prompt_replays = 0  # one-row prompt steps
        self.mixed_replays = 0  # steps of several rows, not all decode

    @torch.inference_mode()
    def capture(self):
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        todo = [(b, b, True) for b in self.buckets] + [(r, t, False) for r, t in self.shapes]
        for rows, tokens, decode in sorted(todo, key=lambda s: (s[1], s[0]), reverse=True):
            g = _Graph(PackedLayout(rows, tokens, decode, self.width, self.block_size),
                       self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: JIT compiles, cuBLAS handles
                self.model.forward(self._graph_step(g), self.kv_cache)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                # the StepInput is made inside the capture: its slices and casts of the
                # packed buffer must re-run on every replay
                g.logits = self.model.forward(self._graph_step(g), self.kv_cache)
            g.graph = graph
            if decode:
                self.graphs[tokens] = g
            else:
                self.varlen_graphs.append(g)
        self.varlen_graphs.sort(key=lambda g: (g.layout.tokens, g.layout.rows))
        torch.cuda.synchronize(self.device)
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info('captured %d decode graphs (buckets %s), %d varlen graphs ((rows, tokens) '
                    '%s), %.1f MiB', len(self.graphs), self.buckets, len(self.varlen_graphs),
                    self.shapes, self.memory_bytes / 2**20)

    def _graph_step(self, g: '_Graph') -> StepInput:
        return g.layout.step_input(g.packed, self.capture_kv_len, self.prev_tokens)

    def bucket_for(self, batch: int) -> Optional[int]:
        return next((b for b in self.buckets if b >= batch), None)

    def graph_for(self, step: StepInput) -> Optional[_Graph]:
        """The smallest graph that serves `step` (None: run it eagerly)."""
        B, T = step.batch_size, step.num_tokens
        if (B == 0 or step.input_ids.device.type != 'cpu'
                or step.block_table.shape[1] > self.width
                or (step.max_kv_len and step.max_kv_len > self.capture_kv_len)
                or (step.prev_tokens is not None
                    and step.prev_tokens.shape[0] > self.prev_tokens.shape[0])):
            return None
        if T == B:
            b = self.bucket_for(B)
            if b is not None and step.sample_idx.shape[0] == B:
                return self.graphs.get(b)
        return next((g for g in self.varlen_graphs if g.layout.fits(step)), None)

    def run(self, step: StepInput, timer=None) -> Optional[torch.Tensor]:
        """Replay for a step the graphs serve; fp32 logits [len(sample_idx), V]. None when no
        graph fits the step (the caller runs it eagerly). `timer`: a StepTimer to lap."""
        g = self.graph_for(step)
        if g is None:
            return None
        g.load(step)
        if step.prev_tokens is not None:
            n = step.prev_tokens.shape[0]
            self.prev_tokens[:n].copy_(step.prev_tokens)
        if timer:
            timer.lap('graph_load')
        g.graph.replay()
        if timer:
            timer.lap('graph_replay')
        S = step.sample_idx.shape[0]
        if g.layout.is_decode:
            self.replays += 1
            if np.array_equal(step.sample_idx.numpy(), np.arange(S)):
                return g.logits[:S].clone()  # the graph's buffer is rewritten by the next replay
            return g.logits.index_select(0, step.sample_idx.to(g.logits.device, torch.long))
        if step.batch_size == 1:
            self.prompt_replays += 1
        else:
            self.mixed_replays += 1
        return g.logits[:S].clone()
