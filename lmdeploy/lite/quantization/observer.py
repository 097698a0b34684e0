"""Running statistics of the KV cache during calibration.

Per layer, per KV head: the min and the max of K and of V over every observed element (all
tokens, all dims, all samples). Every statistic the scale files need follows from these: a TP
slice's per-tensor min/max is the min/max over its heads, and absmax = max(-min, max).
"""
from typing import Dict, List, Tuple

import torch

Stats = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # k_min, k_max, v_min, v_max


def head_min_max(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-head (min, max) of a [batch, heads, tokens, head_dim] tensor."""
    per_head = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
    mn, mx = torch.aminmax(per_head, dim=1)
    return mn.float(), mx.float()


class KVObserver:
    """Collects per-layer, per-head min/max of K and V (see the module docstring)."""

    def __init__(self):
        self._stats: Dict[int, List[torch.Tensor]] = {}

    def observe(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one forward's K and V of `layer`, both [batch, kv_heads, tokens, head_dim]."""
        new = [*head_min_max(k), *head_min_max(v)]
        old = self._stats.get(layer)
        if old is None:
            self._stats[layer] = new
            return
        if old[0].shape != new[0].shape:
            raise ValueError(f'layer {layer}: {new[0].numel()} KV heads, earlier {old[0].numel()}')
        self._stats[layer] = [torch.minimum(old[0], new[0]), torch.maximum(old[1], new[1]),
                              torch.minimum(old[2], new[2]), torch.maximum(old[3], new[3])]

    @property
    def num_layers(self) -> int:
        return len(self._stats)

    @property
    def num_heads(self) -> int:
        return self._stats[0][0].numel() if self._stats else 0

    def stats(self, layer: int) -> Stats:
        """(k_min, k_max, v_min, v_max) of `layer`, float32 [kv_heads] on the CPU."""
        k_min, k_max, v_min, v_max = (t.cpu() for t in self._stats[layer])
        return k_min, k_max, v_min, v_max
