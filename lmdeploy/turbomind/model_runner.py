"""ModelRunner: one rank's data plane. It owns the config, the weights, the KV pool and the
model, and runs one step:

    runner = ModelRunner(EngineConfig.from_workspace('./workspace'))
    logits = runner.run(step_input)       # fp32 [len(sample_idx), vocab_size]

Construction order is the memory plan's: weights first, then (GPU) the activation peak of the
largest step, then the KV pool from what is left (`plan_num_blocks`).
"""
import math
from typing import Callable, Optional

import torch

from . import kernels as _kernels
from .config import EngineConfig
from .kv_cache import KVCache
from .models import build_model
from .step_input import StepInput
from .weights import load_weights

# CPU: a fraction-valued cache_max_entry_count (<= 1) is a fraction of this many full-length
# sessions per batch slot -- there is no device memory to measure on CPU.
CPU_FRACTION_SESSIONS = 1


class ModelRunner:

    def __init__(self, cfg: EngineConfig, rank: int = 0, tp: Optional[int] = None,
                 all_reduce: Optional[Callable] = None, all_gather: Optional[Callable] = None,
                 kernels: Optional[str] = None):
        if cfg.quant_policy & 4:
            raise NotImplementedError('int8 KV cache (quant_policy=4) is not implemented in the '
                                      'data plane yet')
        self.cfg = cfg
        self.rank = rank
        self.tp = cfg.tensor_para_size if tp is None else int(tp)
        self.device = torch.device(cfg.device)
        if self.device.type == 'cuda' and self.device.index is None:
            self.device = torch.device('cuda', torch.cuda.current_device())
        self.dtype = cfg.torch_dtype
        self.kernels = _kernels.select(self.device, kernels)
        self.weights = load_weights(cfg, rank, self.tp, self.device, self.dtype)
        self.model = build_model(cfg, self.weights, self.kernels, all_reduce, all_gather)
        self.num_blocks = self.plan_num_blocks()
        self.kv_cache = KVCache.from_config(cfg, self.num_blocks, self.tp, self.device,
                                            self.dtype)

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    # ----------------------------------------------------------------------------------------
    # Memory plan

    def plan_num_blocks(self) -> int:
        """How many KV blocks the pool gets.

        * ``num_blocks`` > 0 in the config: exactly that;
        * ``cache_max_entry_count`` > 1: v0.0.2's meaning, that many ``session_len``-long
          sessions: ``count * ceil(session_len / block_size)`` blocks;
        * ``cache_max_entry_count`` <= 1: a fraction of the free device memory after weights and
          the activation peak (GPU, `_gpu_free_bytes`); on CPU a fraction of
          ``max_batch_size`` full sessions.
        """
        cfg = self.cfg
        if cfg.num_blocks > 0:
            return cfg.num_blocks
        per_session = cfg.blocks_per_session()
        count = cfg.cache_max_entry_count
        if count > 1:
            return int(count) * per_session
        if self.device.type == 'cuda':
            free = self._gpu_free_bytes()
            per_block = KVCache.bytes_per_block(cfg, self.tp, self.dtype)
            blocks = int(free * count) // per_block
            if blocks < per_session:
                raise RuntimeError(
                    f'KV pool too small: {free * count / 2**30:.2f} GiB '
                    f'(cache_max_entry_count={count} of {free / 2**30:.2f} GiB free) holds '
                    f'{blocks} blocks of {cfg.block_size} tokens, fewer than one session of '
                    f'{cfg.session_len} tokens; raise cache_max_entry_count or lower '
                    'session_len')
            return blocks
        return max(1, math.ceil(count * CPU_FRACTION_SESSIONS * cfg.max_batch_size)) * per_session

    def _gpu_free_bytes(self) -> int:
        """Free device memory once weights are loaded, minus the activation peak of the largest
        step (max_prefill_tokens tokens). TODO(gpu issue): replace the estimate with a profiling
        forward of max_prefill_tokens dummy tokens and torch.cuda.max_memory_allocated(), and
        reserve CUDA-graph memory."""
        torch.cuda.synchronize(self.device)
        free, _total = torch.cuda.mem_get_info(self.device)
        cfg = self.cfg
        elem = torch.empty((), dtype=self.dtype).element_size()
        T = cfg.max_prefill_tokens
        widest = max(cfg.hidden_size, (cfg.q_dim + 2 * cfg.kv_dim) // self.tp,
                     2 * cfg.inter_size // self.tp)
        activations = 4 * T * widest * elem + cfg.max_batch_size * cfg.vocab_size * 4
        return max(0, free - activations)

    # ----------------------------------------------------------------------------------------
    # Step

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor:
        """Forward one step; fp32 logits [len(step.sample_idx), vocab_size] (on the device)."""
        step = step.to(self.device, non_blocking=True)
        return self.model.forward(step, self.kv_cache)
