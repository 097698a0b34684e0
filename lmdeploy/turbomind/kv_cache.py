"""The paged KV pool.

One allocation ``[num_layer, 2, num_blocks, block_size, kv_heads, head_dim]`` in the engine
dtype; layer l's K is ``pool[l, 0]`` and V ``pool[l, 1]``, each
``[num_blocks, block_size, kv_heads, head_dim]`` (kv_heads = this rank's, kv_head_num / tp).

Why this layout:
* a block is contiguous per layer (``block_size * kv_heads * head_dim`` elements for K, the
  same for V), so a block copy/swap is one memcpy per layer and K/V;
* ``[num_blocks, block_size, kv_heads, head_dim]`` is the paged layout flash-attention's
  ``flash_attn_with_kvcache`` and vLLM-style Triton kernels read; viewed as
  ``[num_blocks * block_size, kv_heads, head_dim]`` a token's K/V is one row, addressed by
  ``slot = block_id * block_size + offset`` (StepInput.slot_mapping);
* head_dim is innermost, so one token's head is a contiguous vector for the attention kernels.

Blocks are named by ids 0..num_blocks-1 (the C++ BlockManager hands them out); this module only
holds the memory.

int8 KV (``quant_policy = 4``): the pool is int8, half the bytes of fp16, so the memory plan
fits twice the blocks. Each layer's quantisation parameters (`qparams(i)`, the kernels'
``kv_qparams``, see kernels/kv_quant.py) are either
* static (``kv_int8_scales`` per_tensor / per_head): ``kv_scales [num_layers, 4, kv_heads]``
  fp32, rows (k_scale, k_zp, v_scale, v_zp), from the calibration files (kv_scales.py); or
* online: ``scale_pool [num_layers, 2, num_blocks, kv_heads, block_size]`` fp32, one scale per
  token and head for K and V, written with the block and counted in `bytes_per_block`
  (4 bytes per head_dim int8 values: +3% at head_dim 128).
"""
from typing import List, Optional, Tuple

import torch

from .config import EngineConfig

SCALE_BYTES = 4  # one fp32 online scale per (token, head) for K and for V


def kv_quant_mode(cfg: EngineConfig) -> Optional[str]:
    """None (float KV), 'static' (calibrated scale files) or 'online'."""
    if not cfg.quant_policy & 4:
        return None
    return 'online' if cfg.kv_int8_scales == 'online' else 'static'


class KVCache:

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device='cpu', quant: Optional[str] = None,
                 kv_scales: Optional[torch.Tensor] = None):
        """dtype: the compute dtype (the pool's unless quant); quant: None | 'static' (needs
        kv_scales [num_layers, 4, kv_heads]) | 'online'."""
        if min(num_layers, num_blocks, block_size, kv_heads, head_dim) <= 0:
            raise ValueError(f'KV pool sizes must be positive: layers {num_layers}, blocks '
                             f'{num_blocks}, block_size {block_size}, kv_heads {kv_heads}, '
                             f'head_dim {head_dim}')
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device)
        self.quant = quant
        self.dtype = torch.int8 if quant else dtype
        self.pool = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim,
                                dtype=self.dtype, device=self.device)
        self.kv_scales = self.scale_pool = None
        if quant == 'static':
            if kv_scales is None or tuple(kv_scales.shape) != (num_layers, 4, kv_heads):
                raise ValueError(f'static int8 KV needs kv_scales [{num_layers}, 4, {kv_heads}], '
                                 f'got {None if kv_scales is None else tuple(kv_scales.shape)}')
            self.kv_scales = kv_scales.to(self.device, torch.float32).contiguous()
        elif quant == 'online':
            self.scale_pool = torch.zeros(num_layers, 2, num_blocks, kv_heads, block_size,
                                          dtype=torch.float32, device=self.device)
        elif quant is not None:
            raise ValueError(f"quant must be None, 'static' or 'online', got {quant!r}")

    @classmethod
    def from_config(cls, cfg: EngineConfig, num_blocks: int, tp: int = 1, device=None,
                    dtype=None, kv_scales: Optional[torch.Tensor] = None) -> 'KVCache':
        return cls(cfg.num_layer, num_blocks, cfg.block_size, cfg.kv_head_num // tp,
                   cfg.size_per_head, dtype if dtype is not None else cfg.torch_dtype,
                   device if device is not None else cfg.device, kv_quant_mode(cfg), kv_scales)

    @staticmethod
    def bytes_per_block(cfg: EngineConfig, tp: int = 1, dtype=None) -> int:
        """Bytes one block costs over all layers, K and V, on one rank (int8 KV: 1 byte per
        value, plus the online scales)."""
        mode = kv_quant_mode(cfg)
        dtype = torch.int8 if mode else (dtype if dtype is not None else cfg.torch_dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        per_token_head = cfg.size_per_head * elem + (SCALE_BYTES if mode == 'online' else 0)
        return 2 * cfg.num_layer * cfg.block_size * (cfg.kv_head_num // tp) * per_token_head

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.pool[i, 0], self.pool[i, 1]

    def qparams(self, i: int) -> Optional[torch.Tensor]:
        """Layer i's int8 quantisation parameters for the kernels (None for float KV)."""
        if self.kv_scales is not None:
            return self.kv_scales[i]
        if self.scale_pool is not None:
            return self.scale_pool[i]
        return None

    @property
    def k_caches(self) -> List[torch.Tensor]:
        return [self.pool[i, 0] for i in range(self.num_layers)]

    @property
    def v_caches(self) -> List[torch.Tensor]:
        return [self.pool[i, 1] for i in range(self.num_layers)]

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.kv_scales, self.scale_pool)
                    if t is not None)
        return self.pool.numel() * self.pool.element_size() + extra

    def __repr__(self):
        return (f'KVCache(layers={self.num_layers}, blocks={self.num_blocks}, '
                f'block_size={self.block_size}, kv_heads={self.kv_heads}, '
                f'head_dim={self.head_dim}, dtype={self.dtype}, quant={self.quant}, '
                f'device={self.device}, '
                f'{self.nbytes() / 2**20:.1f} MiB)')
