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
holds the memory. int8 KV (quant_policy 4) will add per-layer scales beside the pool.
"""
from typing import List, Tuple

import torch

from .config import EngineConfig


class KVCache:

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device='cpu'):
        if min(num_layers, num_blocks, block_size, kv_heads, head_dim) <= 0:
            raise ValueError(f'KV pool sizes must be positive: layers {num_layers}, blocks '
                             f'{num_blocks}, block_size {block_size}, kv_heads {kv_heads}, '
                             f'head_dim {head_dim}')
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.pool = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim,
                                dtype=dtype, device=self.device)

    @classmethod
    def from_config(cls, cfg: EngineConfig, num_blocks: int, tp: int = 1, device=None,
                    dtype=None) -> 'KVCache':
        return cls(cfg.num_layer, num_blocks, cfg.block_size, cfg.kv_head_num // tp,
                   cfg.size_per_head, dtype if dtype is not None else cfg.torch_dtype,
                   device if device is not None else cfg.device)

    @staticmethod
    def bytes_per_block(cfg: EngineConfig, tp: int = 1, dtype=None) -> int:
        """Bytes one block costs over all layers, K and V, on one rank."""
        dtype = dtype if dtype is not None else cfg.torch_dtype
        elem = torch.empty((), dtype=dtype).element_size()
        return (2 * cfg.num_layer * cfg.block_size * (cfg.kv_head_num // tp) * cfg.size_per_head
                * elem)

    def layer(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of layer i, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.pool[i, 0], self.pool[i, 1]

    @property
    def k_caches(self) -> List[torch.Tensor]:
        return [self.pool[i, 0] for i in range(self.num_layers)]

    @property
    def v_caches(self) -> List[torch.Tensor]:
        return [self.pool[i, 1] for i in range(self.num_layers)]

    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def __repr__(self):
        return (f'KVCache(layers={self.num_layers}, blocks={self.num_blocks}, '
                f'block_size={self.block_size}, kv_heads={self.kv_heads}, '
                f'head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, '
                f'{self.nbytes() / 2**20:.1f} MiB)')
