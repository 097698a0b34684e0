"""ModelRunner: one rank's data plane. It owns the config, the weights, the KV pool, the model
and its CUDA graphs (decode, lone-prompt and mixed steps; on rank 0, which samples, also the
sampler's: `sampler_graphs`), and runs one step:

    runner = ModelRunner(EngineConfig.from_workspace('./workspace'))
    logits = runner.run(step_input)       # fp32 [len(sample_idx), vocab_size]

    runner = ModelRunner(dummy_config('llama2-7b'), weights_init=dummy_weights)  # no files

Construction order is the memory plan's (GPU):

1. a fit check BEFORE loading: the weights' size (from the shape) plus one session of KV
   against free device memory -- a clear error instead of an OOM half way through loading;
2. int8 KV scales (``quant_policy = 4`` with calibrated scales; kv_scales.py), then weights;
3. a profiling forward of ``max_prefill_tokens`` dummy prompt tokens plus ``max_batch_size``
   decode rows over a scratch KV pool: its ``max_memory_allocated`` growth is the activation
   peak (plus as much again for the caching allocator's rounding and fragmentation, and a
   margin for the sampler's ``[max_batch_size, vocab]`` fp32 work);
4. a reserve for the CUDA graphs' memory pool (their logits outputs plus the largest
   bucket's activations) and, on rank 0, for the sampler graphs' static inputs and pool
   (`SamplerGraphs.reserve_bytes`);
5. the KV pool from ``cache_max_entry_count``: <= 1 is that fraction of what is free after 3
   and 4; > 1 is v0.0.2's count of ``session_len``-long sessions (an error if they do not fit);
6. the CUDA graphs (`cuda_graph.py`), captured over the pool, then the sampler graphs of the
   common sampling modes, without and with one bad word (ignore_eos bans EOS so)
   (`sampler_graphs.py`; the engine captures other modes on first use).

int8 KV halves `KVCache.bytes_per_block`, so the same memory gives twice the blocks (online
scales cost 4 bytes per token, head and K/V on top).

`memory` (a dict) reports every term in bytes.
"""
import logging
import math
from typing import Callable, Optional

import torch

from . import kernels as _kernels
from .config import EngineConfig
from .cuda_graph import (CudaGraphs, default_buckets, mixed_buckets, prompt_buckets,
                         varlen_shapes)
from .distributed import SingleRank
from .kv_cache import KVCache, kv_quant_mode
from .kv_scales import load_kv_scales
from .models import build_model
from .models.llama import DENSE_PROMPT_MIN_TOKENS
from .sampler_graphs import COMMON_MODES, SamplerGraphs
from .sampling import RequestRng, Sampler, SamplingParams
from .step_input import RowPlan, StepInput, build_step_input
from .weights import load_weights

logger = logging.getLogger('lmdeploy.turbomind')

# CPU: a fraction-valued cache_max_entry_count (<= 1) is a fraction of this many full-length
# sessions per batch slot -- there is no device memory to measure on CPU.
CPU_FRACTION_SESSIONS = 1
# Slack kept free beyond the measured terms (allocator fragmentation, NCCL, cuBLAS workspaces).
GPU_SLACK_BYTES = 256 << 20
# The caching allocator rounds and splits blocks, and eager steps of changing shapes fragment
# its segments, so beside the profiled activation peak this much more of it stays free. With
# the peak alone (+ the slack), cache_max_entry_count 1.0 left 0.87 GiB free on the H100 and
# an int8 B2 2048/2048 row ran out twice (each time the allocator frees its whole cache,
# synchronizing, and retries); with the headroom, none (benchmark/NOTES.md, session 5).
ALLOCATOR_HEADROOM = 1.0  # x the activation peak


class ModelRunner:

    def __init__(self, cfg: EngineConfig, rank: int = 0, tp: Optional[int] = None,
                 comm=None, kernels: Optional[str] = None,
                 weights_init: Optional[Callable] = None, cuda_graph: Optional[bool] = None):
        """weights_init(cfg, rank, tp, device, dtype) -> ModelWeights: default
        `weights.load_weights` (the workspace); `dummy.dummy_weights` makes random ones.
        comm: this rank's collectives (distributed.py; default one rank). Every rank of a group
        constructs its runner at the same time: the profiling forward, the pool size
        (`comm.min_int`, so every rank gets the same blocks) and the graph captures are
        collective. cuda_graph overrides cfg.cuda_graph (graphs are only ever captured on
        CUDA)."""
        self.cfg = cfg
        self.rank = rank
        self.tp = cfg.tensor_para_size if tp is None else int(tp)
        self.device = torch.device(cfg.device)
        if self.device.type == 'cuda' and self.device.index is None:
            self.device = torch.device('cuda', torch.cuda.current_device())
        self.dtype = cfg.torch_dtype
        self.kernels = _kernels.select(self.device, kernels)
        use_graphs = cfg.cuda_graph if cuda_graph is None else bool(cuda_graph)
        self.use_cuda_graph = use_graphs and self.device.type == 'cuda'
        self.memory = {}
        if self.device.type == 'cuda':
            self._check_fits()
        self.kv_scales = self._load_kv_scales()  # before the weights: a bad file fails fast
        init = weights_init or load_weights
        self.weights = init(cfg, rank, self.tp, self.device, self.dtype)
        self.comm = comm or SingleRank()
        self.model = build_model(cfg, self.weights, self.kernels, self.comm)
        self.num_blocks = self.comm.min_int(self.plan_num_blocks())
        self.kv_cache = KVCache.from_config(cfg, self.num_blocks, self.tp, self.device,
                                            self.dtype, self.kv_scales)
        self.graphs: Optional[CudaGraphs] = None
        self.sampler_graphs: Optional[SamplerGraphs] = None
        if self.use_cuda_graph:
            self.graphs = CudaGraphs(self.model, self.kv_cache, cfg.blocks_per_session(),
                                     cfg.session_len, self.device,
                                     default_buckets(cfg.max_batch_size), self._prompt_buckets(),
                                     self._mixed_buckets(), cfg.max_batch_size)
            self.graphs.capture()
            self.memory['graphs'] = self.graphs.memory_bytes
            if self._samples():
                self.sampler_graphs = self._capture_sampler_graphs()
        if self.device.type == 'cuda':
            self.memory['kv_cache'] = self.kv_cache.nbytes()
            self.memory['free_after'] = torch.cuda.mem_get_info(self.device)[0]

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def _load_kv_scales(self) -> Optional[torch.Tensor]:
        """Static int8 KV scales of this rank (kv_scales.py); synthetic ones for dummy shapes
        (no files); None for float or online KV."""
        if kv_quant_mode(self.cfg) != 'static':
            return None
        if self.cfg.extra.get('dummy'):
            from .dummy import dummy_kv_scales
            return dummy_kv_scales(self.cfg, self.rank, self.tp)
        return load_kv_scales(self.cfg, self.rank, self.tp)

    # ----------------------------------------------------------------------------------------
    # Memory plan

    def _samples(self) -> bool:
        """Whether this rank samples (rank 0 does; the engine runs beside it)."""
        return self.rank == 0

    def weight_bytes(self) -> int:
        from .dummy import weight_bytes
        return weight_bytes(self.cfg, self.tp, self.dtype)

    def _check_fits(self):
        """Before loading: weights + one session of KV + slack must fit in free memory."""
        cfg = self.cfg
        free, total = torch.cuda.mem_get_info(self.device)
        weights = self.weight_bytes()
        one_session = cfg.blocks_per_session() * KVCache.bytes_per_block(cfg, self.tp,
                                                                         self.dtype)
        need = weights + one_session + GPU_SLACK_BYTES
        self.memory['weights_estimate'] = weights
        if need > free:
            raise RuntimeError(
                f'the model does not fit on {self.device}: weights {weights / 2**30:.2f} GiB + '
                f'one {cfg.session_len}-token session of KV {one_session / 2**30:.2f} GiB + '
                f'{GPU_SLACK_BYTES >> 20} MiB slack > {free / 2**30:.2f} GiB free (of '
                f'{total / 2**30:.2f} GiB); use tensor parallelism, a smaller session_len or a '
                'smaller dtype')

    def plan_num_blocks(self) -> int:
        """How many KV blocks the pool gets.

        * ``num_blocks`` > 0 in the config: exactly that;
        * ``cache_max_entry_count`` > 1: v0.0.2's meaning, that many ``session_len``-long
          sessions: ``count * ceil(session_len / block_size)`` blocks (on GPU, an error when
          they do not fit in what is free after activations and graphs);
        * ``cache_max_entry_count`` <= 1: a fraction of the free device memory after weights,
          the profiled activation peak and the graph reserve (GPU, `_gpu_free_bytes`); on CPU
          a fraction of ``max_batch_size`` full sessions.
        """
        cfg = self.cfg
        if cfg.num_blocks > 0:
            return cfg.num_blocks
        per_session = cfg.blocks_per_session()
        count = cfg.cache_max_entry_count
        if self.device.type != 'cuda':
            if count > 1:
                return int(count) * per_session
            return max(1, math.ceil(count * CPU_FRACTION_SESSIONS * cfg.max_batch_size)) \
                * per_session
        free = self._gpu_free_bytes()
        per_block = KVCache.bytes_per_block(cfg, self.tp, self.dtype)
        if count > 1:
            blocks = int(count) * per_session
            if blocks * per_block > free:
                raise RuntimeError(
                    f'KV pool does not fit: cache_max_entry_count={int(count)} sessions of '
                    f'{cfg.session_len} tokens need {blocks * per_block / 2**30:.2f} GiB, '
                    f'{free / 2**30:.2f} GiB is free after weights, activations and CUDA '
                    'graphs; lower cache_max_entry_count or session_len')
            return blocks
        blocks = int(free * count) // per_block
        if blocks < per_session:
            raise RuntimeError(
                f'KV pool too small: {free * count / 2**30:.2f} GiB '
                f'(cache_max_entry_count={count} of {free / 2**30:.2f} GiB free) holds '
                f'{blocks} blocks of {cfg.block_size} tokens, fewer than one session of '
                f'{cfg.session_len} tokens; raise cache_max_entry_count or lower '
                'session_len')
        return blocks

    def _gpu_free_bytes(self) -> int:
        """Free device memory once weights are loaded, minus the profiled activation peak and
        the allocator's headroom over it, the sampler margin, the graph reserves and a slack."""
        cfg = self.cfg
        activations = self.profile_activation_bytes()
        sampler = cfg.max_batch_size * cfg.vocab_size * 4 * 4
        graphs = self.graph_reserve_bytes() if self.use_cuda_graph else 0
        sampler_graphs = (SamplerGraphs.reserve_bytes(cfg.max_batch_size, cfg.vocab_size)
                          if self.use_cuda_graph and self._samples() else 0)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(self.device)
        headroom = int(activations * ALLOCATOR_HEADROOM)
        self.memory.update(weights=self.weights.nbytes(), activations=activations,
                           allocator_headroom=headroom, sampler_margin=sampler,
                           graph_reserve=graphs, sampler_graph_reserve=sampler_graphs,
                           slack=GPU_SLACK_BYTES, free_before_kv=free)
        return max(0, free - activations - headroom - sampler - graphs - sampler_graphs
                   - GPU_SLACK_BYTES)

    def _prompt_buckets(self):
        return prompt_buckets(min(self.cfg.max_prefill_tokens, self.cfg.session_len))

    def _mixed_buckets(self):
        """Token buckets of the mixed graphs: a mixed step has at most max_batch_size decode
        rows plus max_prefill_tokens prompt tokens."""
        if self.cfg.max_batch_size < 2:
            return []
        cfg = self.cfg
        return mixed_buckets(cfg.max_batch_size + cfg.max_prefill_tokens,
                             cfg.blocks_per_session() * cfg.block_size)

    def graph_reserve_bytes(self) -> int:
        """The graphs' pool: every graph's fp32 logits stay allocated, plus twice the largest
        graph's live activations (the pool is shared, captured largest first): about two
        [tokens, widest] buffers (the FFN's gate|up output and its SiLU product). On the H100,
        Llama-2-7B at max_batch_size 64 with 2048-token mixed graphs: 0.39 GiB measured."""
        cfg = self.cfg
        buckets = default_buckets(cfg.max_batch_size)
        shapes = varlen_shapes(self._prompt_buckets(), self._mixed_buckets(),
                               cfg.max_batch_size)
        elem = torch.empty((), dtype=self.dtype).element_size()
        logits = (sum(buckets) + sum(r for r, _ in shapes)) * cfg.vocab_size * (4 + elem)
        widest = max(cfg.hidden_size, (cfg.q_dim + 2 * cfg.kv_dim) // self.tp,
                     2 * cfg.inter_size // self.tp)
        tokens = max(buckets + [t for _, t in shapes])
        per_step = (tokens * 2 * widest * elem
                    + max(buckets) * 2 * cfg.vocab_size * (4 + elem))
        return logits + 2 * per_step + (32 << 20)

    def _capture_sampler_graphs(self) -> SamplerGraphs:
        """The sampler's graphs (int32 tokens, as the engine hands them on), the common modes
        with bad-words widths 0 and 1 captured now in every bucket; `memory['sampler_graphs']`
        is what they hold."""
        cfg = self.cfg
        graphs = SamplerGraphs(Sampler(kernels=self.kernels), cfg.vocab_size, self.device,
                               cfg.max_batch_size, out_dtype=torch.int32)
        graphs.capture(graphs.keys(COMMON_MODES))
        # all-greedy batches sample eagerly: compile their kernel now, not in a request
        logits = torch.zeros(1, cfg.vocab_size, device=self.device)
        for bad in ((), (0,)):
            params = SamplingParams(top_k=1, bad_words=bad)
            graphs.sampler.sample(logits, [params], [RequestRng(0)])
        torch.cuda.synchronize(self.device)
        self.memory['sampler_graphs'] = graphs.input_bytes + graphs.pool_bytes()
        logger.info('captured %d sampler graphs (row buckets %s), %.1f MiB', graphs.captures,
                    graphs.buckets, self.memory['sampler_graphs'] / 2**20)
        return graphs

    @torch.inference_mode()
    def profile_activation_bytes(self) -> int:
        """Peak bytes the largest steps allocate, over a scratch pool of one session's blocks
        that every row shares (the values do not matter). Two shapes: max_prefill_tokens
        prompt tokens (rows of at most session_len) beside max_batch_size decode rows, and one
        lone fresh prompt as long as a step allows, which takes the dense prompt path (its own
        kernels and attention workspace; this also compiles them before the first request),
        then the shortest such prompt, whose attention may be another kernel (on CUDA: Triton
        below 3072 tokens, cuDNN from there; kernels/triton_prompt_attention.py)."""
        cfg = self.cfg
        row_len = max(1, min(cfg.max_prefill_tokens, cfg.session_len))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        scratch = KVCache.from_config(self.cfg, cfg.blocks_per_session(), self.tp, self.device,
                                      self.dtype, self.kv_scales)
        gen = torch.Generator().manual_seed(0)
        decode_rows = [RowPlan([0], 0, [0], 'last') for _ in range(cfg.max_batch_size)]
        mixed = decode_rows + self._profile_prompts(cfg.max_prefill_tokens, row_len, gen)
        steps = [mixed, self._profile_prompts(row_len, row_len, gen)]
        if DENSE_PROMPT_MIN_TOKENS < row_len:
            steps.append(self._profile_prompts(DENSE_PROMPT_MIN_TOKENS, row_len, gen))
        peak = max(self._step_peak_bytes(rows, scratch) for rows in steps)
        del scratch
        torch.cuda.empty_cache()
        return peak

    def _profile_prompts(self, tokens: int, row_len: int, gen) -> list:
        """Fresh prompt rows of random ids, `tokens` in all, at most `row_len` each."""
        rows = []
        while tokens > 0:
            n = min(row_len, tokens)
            ids = torch.randint(0, self.cfg.vocab_size, (n,), generator=gen).tolist()
            rows.append(RowPlan(ids, 0, list(range(math.ceil(n / self.cfg.block_size))),
                                'last'))
            tokens -= n
        return rows

    def _step_peak_bytes(self, rows: list, scratch: KVCache) -> int:
        step = build_step_input(rows, self.cfg.block_size).to(self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        out = self.model.forward(step, scratch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del out, step
        return int(peak)

    # ----------------------------------------------------------------------------------------
    # Step

    @torch.inference_mode()
    def run(self, step: StepInput, timer=None) -> torch.Tensor:
        """Forward one step; fp32 logits [len(step.sample_idx), vocab_size] (on the device).
        Steps that fit a captured graph (cuda_graph.py) replay it when graphs are on."""
        if self.graphs is not None:
            logits = self.graphs.run(step, timer)
            if logits is not None:
                return logits
        step = step.to(self.device, non_blocking=True)
        if (self.device.type == 'cuda' and step.num_tokens == step.batch_size
                and step.max_kv_len <= self.cfg.session_len):
            # decode-only: the graphs' split hint, so graphs on/off run the same partitions
            step.max_kv_len = self.cfg.session_len
        return self.model.forward(step, self.kv_cache)
