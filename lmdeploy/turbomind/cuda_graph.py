"""CUDA graphs for decode-only steps, one per batch-size bucket.

A decode-only step (every row has q_len 1, so T == B) of B rows runs the graph of the smallest
bucket >= B. Each bucket's graph captured the whole model forward over static buffers:

    packed [Bk * (4 + W)] int64 = input_ids | positions | slot_mapping | kv_lens | block_table
                                                               (W = ceil(session_len / block_size))

Inside the graph the packed buffer is sliced (and kv_lens / block_table cast to int32), so a
replay costs ONE host-to-device copy (from a pinned staging buffer) plus the replay. cu_seqlens
(= arange) and sample_idx (= arange) are constants of the bucket. Rows B..Bk-1 are padding:
token 0 at position 0, slot -1 (store_kv skips it), kv_len 1 over whatever block id is in the
table row (only read, and every value there is a valid pool block: zeros at start, later
earlier rows' first blocks); their logits are dropped.

Attention's split count is a host-side launch parameter: the graphs are captured with the
hint ``max_kv_len = capture_kv_len`` (session_len), valid for any kv_lens up to it. The eager
path uses the same hint for decode-only steps (ModelRunner), so graphs on and off run the
same partitions and give the same numbers at bucket sizes.

All graphs share one memory pool (captured largest first); only each graph's output logits
stay allocated between replays.
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


class _Graph:

    def __init__(self, bucket: int, width: int, device):
        self.bucket = bucket
        self.width = width
        n = bucket * (4 + width)
        self.packed = torch.zeros(n, dtype=torch.long, device=device)
        self.host = torch.zeros(n, dtype=torch.long, pin_memory=True)
        self.host_np = self.host.numpy()
        self.copy_done = torch.cuda.Event()
        self.copy_pending = False
        self.cu_seqlens = torch.arange(bucket + 1, dtype=torch.int32, device=device)
        self.sample_idx = torch.arange(bucket, dtype=torch.long, device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None
        self.reset_padding(0)
        self.packed.copy_(self.host)

    # views of the host staging buffer
    def host_views(self):
        Bk, h = self.bucket, self.host_np
        return (h[0:Bk], h[Bk:2 * Bk], h[2 * Bk:3 * Bk], h[3 * Bk:4 * Bk],
                h[4 * Bk:].reshape(Bk, self.width))

    def reset_padding(self, b: int):
        ids, pos, slots, kvl, _ = self.host_views()
        ids[b:] = 0
        pos[b:] = 0
        slots[b:] = -1
        kvl[b:] = 1

    def step(self, capture_kv_len: int) -> StepInput:
        """The StepInput over the packed device buffer (slices/casts: captured in the graph)."""
        Bk, p = self.bucket, self.packed
        return StepInput(
            input_ids=p[0:Bk], positions=p[Bk:2 * Bk], cu_seqlens=self.cu_seqlens,
            kv_lens=p[3 * Bk:4 * Bk].to(torch.int32),
            block_table=p[4 * Bk:].view(Bk, self.width).to(torch.int32),
            slot_mapping=p[2 * Bk:3 * Bk], sample_idx=self.sample_idx, max_q_len=1,
            max_kv_len=capture_kv_len, num_decode=Bk)


class DecodeGraphs:
    """Captured decode graphs of one runner. `run(step)` for a decode-only step, else None."""

    def __init__(self, model, kv_cache, width: int, capture_kv_len: int, device,
                 buckets: List[int]):
        self.model = model
        self.kv_cache = kv_cache
        self.width = width
        self.capture_kv_len = capture_kv_len
        self.device = device
        self.buckets = sorted(set(int(b) for b in buckets if b > 0))
        self.graphs: Dict[int, _Graph] = {}
        self.pool = None
        self.memory_bytes = 0
        self.replays = 0  # how many steps ran from a graph (tests check the path is taken)

    @torch.inference_mode()
    def capture(self):
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for bucket in sorted(self.buckets, reverse=True):
            g = _Graph(bucket, self.width, self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up: JIT compiles, cuBLAS handles
                self.model.forward(g.step(self.capture_kv_len), self.kv_cache)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                g.logits = self.model.forward(g.step(self.capture_kv_len), self.kv_cache)
            g.graph = graph
            self.graphs[bucket] = g
        torch.cuda.synchronize(self.device)
        self.memory_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info('captured %d decode graphs (buckets %s), %.1f MiB', len(self.graphs),
                    self.buckets, self.memory_bytes / 2**20)

    def bucket_for(self, batch: int) -> Optional[int]:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def eligible(self, step: StepInput) -> bool:
        B = step.batch_size
        return (B > 0 and step.num_tokens == B and B <= self.buckets[-1]
                and (not step.max_kv_len or step.max_kv_len <= self.capture_kv_len)
                and step.block_table.shape[1] <= self.width)

    def run(self, step: StepInput) -> Optional[torch.Tensor]:
        """Replay for a decode-only step; fp32 logits [len(sample_idx), V]. None when the
        step is not decode-only (or does not fit a bucket)."""
        if not self.graphs or not self.eligible(step):
            return None
        B = step.batch_size
        g = self.graphs[self.bucket_for(B)]
        Bk = g.bucket
        if g.copy_pending:  # the previous copy from the staging buffer must be done
            g.copy_done.synchronize()
        on_host = step.input_ids.device.type == 'cpu'
        if on_host:
            ids, pos, slots, kvl, table = g.host_views()
            ids[:B] = step.input_ids.numpy()
            pos[:B] = step.positions.numpy()
            slots[:B] = step.slot_mapping.numpy()
            kvl[:B] = step.kv_lens.numpy()
            w = step.block_table.shape[1]
            table[:B, :w] = step.block_table.numpy()
            g.reset_padding(B)
            g.packed.copy_(g.host, non_blocking=True)
            g.copy_done.record()
            g.copy_pending = True
        else:
            p = g.packed
            p[0:B].copy_(step.input_ids)
            p[Bk:Bk + B].copy_(step.positions)
            p[2 * Bk:2 * Bk + B].copy_(step.slot_mapping)
            p[3 * Bk:3 * Bk + B].copy_(step.kv_lens)
            w = step.block_table.shape[1]
            p[4 * Bk:].view(Bk, self.width)[:B, :w].copy_(step.block_table)
            p[B:Bk].zero_()
            p[Bk + B:2 * Bk].zero_()
            p[2 * Bk + B:3 * Bk].fill_(-1)
            p[3 * Bk + B:4 * Bk].fill_(1)
        g.graph.replay()
        self.replays += 1
        logits = g.logits
        S = step.sample_idx.shape[0]
        if on_host and S == B and np.array_equal(step.sample_idx.numpy(), np.arange(B)):
            return logits[:B].clone()  # the graph's buffer is rewritten by the next replay
        return logits.index_select(0, step.sample_idx.to(logits.device, torch.long))
