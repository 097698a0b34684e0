"""CUDA graphs of the sampler for small batches: a step's sampling costs a handful of host ops.

`Sampler.forward` is up to ~40 small torch ops (the counter-based RNG's int64 hash, the
top-k/top-p thresholds) and the `sample_tokens` kernel, each launched from Python: before that
kernel took over the draw, 1.4-1.9 ms of host time per step on the H100 (Llama-2-7B serving,
~4 rows a step), against ~0.55 ms for the whole forward's graph replay. `SamplerGraphs` replays the same ops from a CUDA graph: a call
is three copies into static inputs (four with bad words), one replay and one copy out.

    graphs = SamplerGraphs(Sampler(), vocab_size, device, max_rows=cfg.max_batch_size)
    graphs.capture(graphs.keys(COMMON_MODES))    # optional: ahead of time, at start-up
                                                 # (each mode without and with one bad word)
    tokens = graphs(logits, batch)               # == Sampler()(logits, batch), bit for bit

Graphs
------
One graph per `GraphKey`: a row bucket (`sampler_buckets`: powers of two below
min(max_rows, 64), and that bound) and the host-side flags that choose `Sampler.forward`'s
branches, normalised so that flag sets running the same ops share a graph: ``thresholds``
(any_top_k or any_top_p: the top-k/top-p block runs), ``top_p`` (any_top_p: its nucleus part
runs) and ``top_k`` (max_top_k where forward takes its `torch.topk` path, else 0: a full sort)
and ``bad`` (the bad-words width: `batch.bad_ids`' columns rounded up to a power of two, 0
for none; wider than `MAX_BAD_WIDTH`: eager). Every graph runs `forward` over views of static
inputs shared by all of them: fp32 logits [max_bucket, V], the per-row parameters packed as
`SamplingSlots` packs them, fp32 [3, max_bucket] (temperature, top_p, repetition_penalty) and
int64 [3, max_bucket] (top_k, keys, counters), and int64 bad ids [max_bucket, MAX_BAD_WIDTH],
of which a graph of width ``bad`` reads the columns [:bad]. A call copies its S rows in and
replays its bucket's graph. Rows S..bucket-1 keep what they held (zeros at first: temperature
0, greedy rows, id 0 banned; later an earlier call's rows): valid values, and every op is
row-wise, so they only cost their share of the work and their outputs are dropped. Within
rows :S the call's bad ids fill the columns [:bad], padded with -1 (ignored ids):
`SamplingSlots` hands them out at that width already, so that is one copy; an unpadded
batch's columns W..bad are set to -1 by one more op, so an earlier, wider call's ids never
leak into a narrower one.

The tokens are the eager sampler's: the graph runs the same kernels on the same rows, and no
kernel's per-row arithmetic depends on the number of rows (softmax's block size and cumsum's
scan depend on the row length only; argmax, topk, sort, gather and searchsorted are exact),
except that cumsum takes another path for a one-row tensor, so S = 1 has a bucket of its own.
The -1 columns of padded bad ids change nothing: `sample_tokens` (and `ban_tokens` before the
thresholds) ignore ids out of range. Both capture like the rest, with no host sync and no
shape that depends on the data.

Eager instead (counted in `fallbacks`): not CUDA, S == 0, S above the largest bucket, logits of
another width or device, all rows greedy (one `sample_tokens` launch, bad words included, e.g.
greedy with ``ignore_eos``: a graph's input copies cost more), a repetition penalty (its
ids are the whole history, wider every step), more than `MAX_BAD_WIDTH` bad words in a row, or
a new key once `max_graphs` exist.

The returned tokens are a new tensor (``out[:S].to(out_dtype)``, int64 by default; the engine
asks for int32, so the cast it makes anyway is the copy): the next replay rewrites the graph's
output, while the engine keeps a step's tokens on the device for the step after it.

Capture
-------
Lazily, on the first call with a key (on the caller's thread: the engine loop), or ahead of
time with `capture(keys)`. `torch.cuda.graph`'s ``__enter__`` (torch 2.11, as later ones)
calls ``torch.cuda.synchronize()`` and ``torch.cuda.empty_cache()`` (and ``gc.collect()`` when
``torch.compiler.config.force_cudagraph_gc``) before ``capture_begin``: mid-serving that would
drain the device under the pipelined loop and hand the allocator's cache back to the driver, so
the next steps would cudaMalloc again. Hence `CUDAGraph.capture_begin`/``capture_end`` are
called directly, on a private side stream that first waits for the current one, with
``capture_error_mode='thread_local'`` (other threads' CUDA calls, e.g. a server thread freeing
pinned memory, cannot invalidate the capture) and the garbage collector paused (a collection
inside the capture could free tensors of other streams). Replays run on the caller's current
stream, which must be the same stream on every call (the engine's default stream): the graphs
share their pool, so two replays must never overlap.

One eager warm-up run of the same call precedes each capture (it loads the kernels' modules and
runs any first-call set-up outside the capture). It runs on the current stream, not the side
stream: the sampler keeps no per-stream state (no cuBLAS or NCCL handles), and the blocks the
warm-up frees then return to the cache the eager steps use instead of being stranded on the side
stream until an `empty_cache`.

Memory
------
All graphs share one private pool (`torch.cuda.graph_pool_handle`). Between replays only each
graph's output ([bucket] int64) stays allocated; the pool keeps the largest capture's peak of
intermediates: up to ~9 fp32 [bucket, V] buffers for the full-sort top-p path (the scaled logits,
sort's values and int64 indices with cub's double buffers, the thresholded logits, softmax,
cumsum) and one more with bad words (their out-of-place scatter), rounded up to the allocator's
segments, plus what later captures could not fit in it. `reserve_bytes(max_rows, vocab_size)`
is what the memory plan sets aside for the pool and the static inputs (~157 MiB at 64 rows x
32000, ~486 MiB at 64 x 128256). Capturing the largest bucket first (`capture`, as the runner
does at start-up) keeps the pool near one peak, which later captures reuse; `pool_bytes()`
measures it.
"""
import gc
import logging
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

from .sampling import Sampler, SamplingBatch

logger = logging.getLogger('lmdeploy.turbomind')

MAX_ROWS = 64  # larger steps sample eagerly: their device time hides the launches
MAX_BAD_WIDTH = 8  # bad-words widths above this sample eagerly (usually just EOS: 1)
# fp32 [rows, V] buffers the pool may hold per row of the largest bucket: the full-sort top-p
# path's peak (~9, int64 counted twice), one more for the bad words' scatter, plus the
# allocator's rounding and the segments of smaller buckets captured before the largest. On the
# H100 the 12 graphs of the common modes without bad words held 494 MiB at 64 rows x 128256
# (~15.8 such buffers with the inputs; 114 MiB at V 32000): 16 leaves a little room.
POOL_ROWS_OF_V = 16
# The caching allocator's segment sizes: a request of 1-10 MiB takes a 20 MiB segment, one of
# up to 1 MiB a 2 MiB one; at small buckets these dominate the per-row terms.
POOL_SLACK_BYTES = 48 << 20


class GraphKey(NamedTuple):
    """What a graph was captured for: a row bucket and `Sampler.forward`'s branch flags."""
    rows: int
    thresholds: bool  # the top-k/top-p block runs (any_top_k or any_top_p)
    top_p: bool  # ... with its nucleus part (any_top_p)
    top_k: int  # the torch.topk width (max_top_k on forward's fast path), 0: a full sort
    bad: int = 0  # the bad ids' width (a power of two), 0: no bad words


# (any_top_k, any_top_p, max_top_k) of the common requests: temperature only; top_p only;
# top_k 40 + top_p (v0.0.2's defaults).
COMMON_MODES = ((False, False, 0), (False, True, 0), (True, True, 40))
# Bad-words widths captured at start-up with each mode: none, and ignore_eos's banned EOS.
COMMON_BAD_WIDTHS = (0, 1)


def sampler_buckets(max_rows: int, limit: int = MAX_ROWS) -> List[int]:
    """Row buckets: 1, 2, 4, ... below min(max_rows, limit), and that bound itself."""
    top = min(int(max_rows), int(limit))
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return out + [top] if top > 0 else []


def bad_width(width: int) -> int:
    """`width` bad-id columns rounded up to a power of two (0 stays 0)."""
    return 1 << (int(width) - 1).bit_length() if width > 0 else 0


def mode_key(rows: int, any_top_k: bool, any_top_p: bool, max_top_k: int, vocab_size: int,
             topk_fast_path: int, bad: int = 0) -> GraphKey:
    """The key of a bucket, a batch's branch flags and bad-ids width, normalised (module
    doc)."""
    thresholds = bool(any_top_k or any_top_p)
    max_top_k = int(max_top_k)
    fast = thresholds and 0 < max_top_k <= topk_fast_path and max_top_k < vocab_size
    return GraphKey(rows, thresholds, bool(any_top_p), max_top_k if fast else 0, bad_width(bad))


def graph_key(batch: SamplingBatch, rows: int, width: int, buckets: List[int], vocab_size: int,
              topk_fast_path: int) -> Optional[GraphKey]:
    """The graph that samples `rows` rows of `width` logits with `batch`; None: eager (no rows,
    more rows than the largest bucket, another width, all rows greedy, a repetition penalty or
    more than `MAX_BAD_WIDTH` bad words)."""
    if (rows == 0 or not buckets or rows > buckets[-1] or width != vocab_size
            or batch.size != rows or batch.any_penalty):
        return None
    bad = batch.bad_ids
    bad = bad_width(bad.shape[1]) if bad is not None and bad.numel() else 0
    if bad > MAX_BAD_WIDTH or batch.all_greedy:  # one sample_tokens launch, bad words included
        return None
    bucket = next(b for b in buckets if b >= rows)
    return mode_key(bucket, batch.any_top_k, batch.any_top_p, batch.max_top_k, vocab_size,
                    topk_fast_path, bad)


class _Graph:
    __slots__ = ('graph', 'out')

    def __init__(self, graph: torch.cuda.CUDAGraph, out: torch.Tensor):
        self.graph, self.out = graph, out


class SamplerGraphs:
    """`Sampler` calls replayed from CUDA graphs (module doc); same call and result as the
    wrapped sampler's, with the tokens as `out_dtype`.

    Counters: `replays` (calls served by a graph), `captures` (graphs captured), `fallbacks`
    (calls run eagerly)."""

    def __init__(self, sampler: Sampler, vocab_size: int, device, max_rows: int = MAX_ROWS,
                 limit: int = MAX_ROWS, max_graphs: int = 96,
                 out_dtype: torch.dtype = torch.int64):
        self.sampler = sampler
        self.vocab_size = int(vocab_size)
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
        self.device = device
        self.buckets = sampler_buckets(max_rows, limit) if device.type == 'cuda' else []
        self.max_graphs = int(max_graphs)
        self.out_dtype = out_dtype
        self.graphs: Dict[GraphKey, _Graph] = {}
        self.failed: set = set()  # keys whose capture raised: eager from then on
        self.replays = self.captures = self.fallbacks = 0
        self._views: Dict[int, Tuple[torch.Tensor, ...]] = {}  # S -> views of the inputs
        self._bad_views: Dict[Tuple[int, int], torch.Tensor] = {}  # (S, width) -> bad ids
        if not self.buckets:
            return
        rows = self.buckets[-1]
        # plain tensors even if made under inference_mode: the calls copy into them in place
        with torch.inference_mode(False):
            self.logits = torch.zeros(rows, self.vocab_size, dtype=torch.float32, device=device)
            self.floats = torch.zeros(3, rows, dtype=torch.float32, device=device)
            self.ints = torch.zeros(3, rows, dtype=torch.int64, device=device)
            self.bad = torch.zeros(rows, MAX_BAD_WIDTH, dtype=torch.int64, device=device)
        self.input_bytes = sum(t.numel() * t.element_size()
                               for t in (self.logits, self.floats, self.ints, self.bad))
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    @staticmethod
    def reserve_bytes(max_rows: int, vocab_size: int, limit: int = MAX_ROWS) -> int:
        """Device memory to plan for the static inputs and the graphs' pool (module doc)."""
        buckets = sampler_buckets(max_rows, limit)
        if not buckets:
            return 0
        rows, row_bytes = buckets[-1], int(vocab_size) * 4
        inputs = rows * row_bytes + (6 + MAX_BAD_WIDTH) * rows * 8
        return inputs + POOL_ROWS_OF_V * rows * row_bytes + POOL_SLACK_BYTES

    # ----------------------------------------------------------------------------------------
    # Calls

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        key = self.key(logits, batch)
        graph = None
        if key is not None:
            graph = self.graphs.get(key)
            if graph is None:
                graph = self._capture(key)
        if graph is None:
            return self._eager(logits, batch)
        S = logits.shape[0]
        self._load(S, logits, batch, key.bad)
        graph.graph.replay()
        self.replays += 1
        return graph.out[:S].to(self.out_dtype, copy=True)

    def key(self, logits: torch.Tensor, batch: SamplingBatch) -> Optional[GraphKey]:
        """The graph a call would replay (captured or not); None: it runs eagerly."""
        if not self.buckets or logits.dim() != 2 or logits.device != self.device:
            return None
        return graph_key(batch, logits.shape[0], logits.shape[1], self.buckets,
                         self.vocab_size, self.sampler.topk_fast_path)

    def keys(self, modes: Iterable[Tuple[bool, bool, int]] = COMMON_MODES,
             bad_widths: Iterable[int] = COMMON_BAD_WIDTHS) -> List[GraphKey]:
        """The keys of `modes` (a batch's (any_top_k, any_top_p, max_top_k) each) with each of
        `bad_widths` in every bucket."""
        fast = self.sampler.topk_fast_path
        return sorted({mode_key(b, *mode, self.vocab_size, fast, w)
                       for b in self.buckets for mode in modes for w in bad_widths})

    def _eager(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        self.fallbacks += 1
        out = self.sampler(logits, batch)
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)

    def _load(self, S: int, logits: torch.Tensor, batch: SamplingBatch, bad: int):
        """Copy the call's rows into the static inputs: three copies from a packed batch, four
        with bad words padded to their key's width (module doc)."""
        views = self._views.get(S)
        if views is None:
            f, i = self.floats[:, :S], self.ints[:, :S]
            views = self._views[S] = (self.logits[:S], f, i, f[0], f[1], i[0], i[1], i[2])
        views[0].copy_(logits)
        if bad:
            dst = self._bad_views.get((S, bad))
            if dst is None:
                dst = self._bad_views[S, bad] = self.bad[:S, :bad]
            ids = batch.bad_ids
            W = ids.shape[1]
            if W == bad:
                dst.copy_(ids)
            else:
                dst[:, :W].copy_(ids)
                dst[:, W:].fill_(-1)
        packed = batch.packed()
        if packed is not None:
            views[1].copy_(packed[0])
            views[2].copy_(packed[1])
            return
        # the repetition penalty row is never read: graphs only serve batches without one
        for dst, src in zip(views[3:], (batch.temperature, batch.top_p, batch.top_k,
                                        batch.keys, batch.counters)):
            dst.copy_(src)

    # ----------------------------------------------------------------------------------------
    # Capture

    def capture(self, keys: Iterable[GraphKey]) -> int:
        """Capture `keys` now (largest bucket first, so the smaller graphs reuse the pool's
        blocks); returns how many graphs were new."""
        new = 0
        for key in sorted(set(keys), key=lambda k: (-k.rows, k)):
            if key not in self.graphs and self._capture(key) is not None:
                new += 1
        return new

    def _static_batch(self, key: GraphKey) -> SamplingBatch:
        f, i = self.floats[:, :key.rows], self.ints[:, :key.rows]
        bad = self.bad[:key.rows, :key.bad] if key.bad else None
        return SamplingBatch(temperature=f[0], top_p=f[1], repetition_penalty=f[2],
                             top_k=i[0], keys=i[1], counters=i[2], bad_ids=bad,
                             any_top_k=key.thresholds, any_top_p=key.top_p, any_penalty=False,
                             max_top_k=key.top_k)

    def _capture(self, key: GraphKey) -> Optional[_Graph]:
        """Capture `key`'s graph without a device synchronize (module doc); None when the
        graph count is at its limit or the capture failed (the call runs eagerly)."""
        if key in self.failed or len(self.graphs) >= self.max_graphs:
            return None
        logits, batch = self.logits[:key.rows], self._static_batch(key)
        current = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.sampler.forward(logits, batch)  # warm-up, on the current stream (module doc)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool, capture_error_mode='thread_local')
                try:
                    out = self.sampler.forward(logits, batch)
                finally:
                    graph.capture_end()
        except Exception:  # noqa: BLE001 - this key samples eagerly; the engine goes on
            logger.warning('sampler graph %s: capture failed, sampling eagerly', key,
                           exc_info=True)
            self.failed.add(key)
            return None
        finally:
            if collecting:
                gc.enable()
        current.wait_stream(self.stream)
        self.captures += 1
        g = self.graphs[key] = _Graph(graph, out)
        return g

    def pool_bytes(self) -> int:
        """Bytes the graphs' pool holds now (walks the allocator's snapshot: tests, reports)."""
        if not self.buckets:
            return 0
        pool = tuple(self.pool)
        return sum(s['total_size'] for s in torch.cuda.memory_snapshot()
                   if s.get('device') == self.device.index
                   and tuple(s.get('segment_pool_id', ())) == pool)
