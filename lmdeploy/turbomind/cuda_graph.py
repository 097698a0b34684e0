"""CUDA graphs for small steps: decode-only steps, one graph per batch-size bucket, and
one-row prompt (or prompt-chunk) steps, one graph per token-count bucket. Eager launches of a
7B forward cost ~20 ms of host time, far more than a small step's GPU time; a replay costs one
host-to-device copy plus the replay.

Each graph captured the whole model forward over one static int64 buffer:

    packed = input_ids[T] | positions[T] | slot_mapping[T] | kv_lens[R] | sample_idx[S]
             | block_table[R, W]                          (W = ceil(session_len / block_size))

sliced (and kv_lens / block_table cast to int32) inside the graph. cu_seqlens is a constant of
the graph.

* Decode graph (R = T = S = bucket): rows B..bucket-1 are padding: token 0 at position 0,
  slot -1 (store_kv skips it), kv_len 1 over whatever block id is in the table row (only read;
  every value there is a valid pool block: zeros at start, later earlier rows' first blocks);
  their logits are dropped. sample_idx is the constant arange.
* Prompt graph (R = S = 1, T = bucket): a row of n <= T new tokens over any cached prefix is
  run as a row of T tokens whose last T - n are padding: they follow the real ones (so no real
  token attends to them), are never written (slot -1), and their table entries point at the
  row's first block (read only by the padding). kv_len is declared as prefix + T, so the real
  token i still sits at position prefix + i. sample_idx (one entry) is the real last token.
* Mixed steps (decode rows, then at most MAX_SPLIT_PROMPTS prompt rows) run as one decode
  replay plus one prompt replay per prompt row (`_run_split`); rows are independent, so the
  logits are the same rows an eager forward gives.

Attention's decode split count is a host-side launch parameter: graphs are captured with the
hint ``max_kv_len = capture_kv_len`` (session_len), valid for any kv_lens up to it. The eager
path uses the same hint for decode-only steps (ModelRunner), so graphs on and off run the same
partitions. All graphs share one memory pool (captured largest first); only each graph's output
logits stay allocated between replays.
"""
import logging
from typing import Dict, List, Optional

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


# A mixed step with at most this many prompt rows runs as replays (see CudaGraphs._run_split);
# with more, the repeated weight reads cost more than the eager launches.
MAX_SPLIT_PROMPTS = 2


def prompt_buckets(max_tokens: int) -> List[int]:
    """Token-count buckets of the one-row prompt graphs: 16, 32, ..., up to min(512,
    max_tokens). Longer prompts are GPU-bound: eager launches cost nothing there."""
    out, t = [], 16
    while t <= min(512, max_tokens):
        out.append(t)
        t *= 2
    return out


class _Graph:
    """One captured forward: `rows` rows, `tokens` new tokens, `samples` logits rows."""

    def __init__(self, rows: int, tokens: int, width: int, block_size: int, device):
        self.rows, self.tokens, self.width, self.block_size = rows, tokens, width, block_size
        self.is_decode = rows == tokens
        self.samples = rows
        R, T, S = rows, tokens, self.samples
        self.offsets = np.cumsum([0, T, T, T, R, S, R * width]).tolist()
        n = self.offsets[-1]
        self.packed = torch.zeros(n, dtype=torch.long, device=device)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=True)
        self.host_np = self.host.numpy()
        self.copy_done = torch.cuda.Event()
        self.copy_pending = False
        cu = np.arange(R + 1) if self.is_decode else np.array([0, T])
        self.cu_seqlens = torch.as_tensor(cu, dtype=torch.int32, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None
        ids, pos, slots, kvl, sidx, _ = self.views(self.host_np)
        sidx[:] = np.arange(S) if self.is_decode else T - 1
        slots[:] = -1
        kvl[:] = 1 if self.is_decode else T
        self.packed.copy_(self.host)

    def views(self, buf):
        """(input_ids, positions, slot_mapping, kv_lens, sample_idx, block_table) of `buf`."""
        o = self.offsets
        parts = [buf[o[i]:o[i + 1]] for i in range(6)]
        parts[5] = parts[5].reshape(self.rows, self.width)
        return parts

    def step_input(self, capture_kv_len: int) -> StepInput:
        """The StepInput over the packed device buffer (slices/casts: captured in the graph)."""
        ids, pos, slots, kvl, sidx, table = self.views(self.packed)
        return StepInput(input_ids=ids, positions=pos, cu_seqlens=self.cu_seqlens,
                         kv_lens=kvl.to(torch.int32), block_table=table.to(torch.int32),
                         slot_mapping=slots, sample_idx=sidx, max_q_len=self.tokens // self.rows,
                         max_kv_len=capture_kv_len, num_decode=self.rows if self.is_decode else 0)

    def load(self, step: StepInput):
        """Stage `step` into the graph's buffer (padding as the module doc says) and copy it
        to the device (one copy from pinned memory when the plan is on the host)."""
        if self.copy_pending:  # the previous copy from the staging buffer must be done
            self.copy_done.synchronize()
        B, n = step.batch_size, step.num_tokens
        on_host = step.input_ids.device.type == 'cpu'
        buf = self.host_np if on_host else self.packed
        ids, pos, slots, kvl, sidx, table = self.views(buf)

        def put(dst, src):
            dst[...] = src.numpy() if on_host else src

        put(ids[:n], step.input_ids)
        put(pos[:n], step.positions)
        put(slots[:n], step.slot_mapping)
        w = step.block_table.shape[1]
        put(table[:B, :w], step.block_table)
        ids[n:] = 0
        slots[n:] = -1
        if self.is_decode:
            put(kvl[:B], step.kv_lens)
            pos[n:] = 0
            kvl[B:] = 1
        else:
            pad = self.tokens - n
            kv_len = int(step.kv_lens[0])
            kvl[0] = kv_len + pad
            put(sidx[:], step.sample_idx)
            if pad:
                ar = np.arange(1, pad + 1) if on_host else torch.arange(
                    1, pad + 1, device=buf.device)
                pos[n:] = pos[n - 1] + ar
            real, blocks = -(-kv_len // self.block_size), -(-(kv_len + pad) // self.block_size)
            table[0, real:blocks] = table[0, 0]
        if on_host:
            self.packed.copy_(self.host, non_blocking=True)
            self.copy_done.record()
            self.copy_pending = True


class CudaGraphs:
    """Captured graphs of one runner. `run(step)` replays for a decode-only step or a one-row
    prompt step that fits a bucket, else returns None (the caller runs eagerly)."""

    def __init__(self, model, kv_cache, width: int, capture_kv_len: int, device,
                 buckets: List[int], prompt_buckets: List[int] = ()):
        self.model = model
        self.kv_cache = kv_cache
        self.width = width
        self.block_size = kv_cache.block_size
        self.capture_kv_len = capture_kv_len
        self.device = device
        self.buckets = sorted(set(int(b) for b in buckets if b > 0))
        self.prompt_buckets = sorted(set(int(t) for t in prompt_buckets if t > 1))
        self.graphs: Dict[int, _Graph] = {}
        self.prompt_graphs: Dict[int, _Graph] = {}
        self.pool = None
        self.memory_bytes = 0
        self.replays = 0  # how many steps ran from a graph (tests check the path is taken)
        self.prompt_replays = 0
        self.split_replays = 0  # mixed steps run as several replays

    @torch.inference_mode()
    def capture(self):
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        todo = [(b, b) for b in self.buckets] + [(1, t) for t in self.prompt_buckets]
        for rows, tokens in sorted(todo, key=lambda rt: rt[1] * 64 + rt[0], reverse=True):
            g = _Graph(rows, tokens, self.width, self.block_size, self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: JIT compiles, cuBLAS handles
                self.model.forward(g.step_input(self.capture_kv_len), self.kv_cache)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                g.logits = self.model.forward(g.step_input(self.capture_kv_len), self.kv_cache)
            g.graph = graph
            (self.graphs if g.is_decode else self.prompt_graphs)[tokens] = g
        torch.cuda.synchronize(self.device)
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info('captured %d decode graphs (buckets %s) and %d prompt graphs (tokens %s), '
                    '%.1f MiB', len(self.graphs), self.buckets, len(self.prompt_graphs),
                    self.prompt_buckets, self.memory_bytes / 2**20)

    def bucket_for(self, batch: int) -> Optional[int]:
        return next((b for b in self.buckets if b >= batch), None)

    def _graph_for(self, step: StepInput) -> Optional[_Graph]:
        B, T = step.batch_size, step.num_tokens
        if B == 0 or step.block_table.shape[1] > self.width:
            return None
        if T == B:
            if B > self.buckets[-1] or (step.max_kv_len and
                                        step.max_kv_len > self.capture_kv_len):
                return None
            return self.graphs.get(self.bucket_for(B))
        if B != 1 or step.sample_idx.shape[0] != 1 or not self.prompt_buckets:
            return None
        tokens = next((t for t in self.prompt_buckets if t >= T), None)
        if tokens is None:
            return None
        kv_len = int(step.kv_lens[0]) + tokens - T
        if -(-kv_len // self.block_size) > self.width or kv_len > self.capture_kv_len:
            return None
        return self.prompt_graphs.get(tokens)

    def run(self, step: StepInput) -> Optional[torch.Tensor]:
        """Replay for a step the graphs serve; fp32 logits [len(sample_idx), V]. None when no
        graph fits the step (the caller runs it eagerly)."""
        if not (self.graphs or self.prompt_graphs):
            return None
        g = self._graph_for(step)
        if g is None:
            return self._run_split(step)
        return self._replay(g, step)

    def _run_split(self, step: StepInput) -> Optional[torch.Tensor]:
        """A mixed step (decode rows, then up to MAX_SPLIT_PROMPTS prompt rows) as one decode
        graph replay plus one prompt graph replay per prompt row. Each replay reads the weights
        again (~4.7 ms for a 7B model on an H100), far less than the ~20 ms of host time the
        eager forward's launches cost; rows are independent, so the results are the same."""
        B, nd = step.batch_size, step.num_decode
        if (step.input_ids.device.type != 'cpu' or not 0 < B - nd <= MAX_SPLIT_PROMPTS
                or (nd == 0 and B == 1)):
            return None
        cu = step.cu_seqlens.tolist()
        last = {cu[b + 1] - 1: b for b in range(B)}  # a row's last token -> the row
        rows = [last.get(i) for i in step.sample_idx.tolist()]
        if None in rows or rows[:nd] != list(range(nd)):  # decode() rows, or a quiet decode row
            return None
        parts, pieces = [], {}
        if nd:
            dec = StepInput(
                input_ids=step.input_ids[:nd], positions=step.positions[:nd],
                cu_seqlens=step.cu_seqlens[:nd + 1], kv_lens=step.kv_lens[:nd],
                block_table=step.block_table[:nd], slot_mapping=step.slot_mapping[:nd],
                sample_idx=torch.arange(nd), max_q_len=1, max_kv_len=step.max_kv_len,
                num_decode=nd)
            parts.append(('decode', dec))
        for b in range(nd, B):
            a, e = cu[b], cu[b + 1]
            parts.append((b, StepInput(
                input_ids=step.input_ids[a:e], positions=step.positions[a:e],
                cu_seqlens=torch.tensor([0, e - a], dtype=step.cu_seqlens.dtype),
                kv_lens=step.kv_lens[b:b + 1], block_table=step.block_table[b:b + 1],
                slot_mapping=step.slot_mapping[a:e], sample_idx=torch.tensor([e - a - 1]),
                max_q_len=e - a, max_kv_len=int(step.kv_lens[b]), num_decode=0)))
        graphs = [(key, self._graph_for(sub), sub) for key, sub in parts]
        if any(g is None for _, g, _ in graphs):
            return None
        for key, g, sub in graphs:
            pieces[key] = self._replay(g, sub)
        self.split_replays += 1
        out = [pieces['decode'][r] if r < nd else pieces[r][0] for r in rows]
        return torch.stack(out) if out else pieces[graphs[0][0]][:0]

    def _replay(self, g: _Graph, step: StepInput) -> torch.Tensor:
        g.load(step)
        g.graph.replay()
        if g.is_decode:
            self.replays += 1
        else:
            self.prompt_replays += 1
            return g.logits.clone()  # the graph's buffer is rewritten by the next replay
        B = step.batch_size
        logits = g.logits
        S = step.sample_idx.shape[0]
        if (step.sample_idx.device.type == 'cpu' and S == B
                and np.array_equal(step.sample_idx.numpy(), np.arange(B))):
            return logits[:B].clone()
        return logits.index_select(0, step.sample_idx.to(logits.device, torch.long))
