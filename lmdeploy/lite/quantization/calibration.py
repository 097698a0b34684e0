"""The calibration run: forward each sample through the HF model with a KV cache and feed the
cache's K and V (K after rotary embedding, as the engine stores it) to a KVObserver.

The base model (no LM head) runs with `use_cache=True`; its cache is read whatever its shape:
transformers' Cache objects (`.layers[i].keys/.values`, older `.key_cache/.value_cache`) or the
legacy tuple of (k, v) pairs that remote-code models return.
"""
from contextlib import nullcontext
from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

from .observer import KVObserver


class CalibrationError(RuntimeError):
    """The model's forward did not give a usable KV cache."""


def output_cache(output):
    """The KV cache of a forward's output (ModelOutput or tuple)."""
    if isinstance(output, dict):
        for key in ('cache', 'past_key_values'):  # transformers >= 5.2 names it `cache`
            if key in output.keys() and output[key] is not None:
                return output[key]
        raise CalibrationError('the model returned no KV cache (use_cache=True gave none)')
    if isinstance(output, (tuple, list)) and len(output) > 1:
        return output[1]
    raise CalibrationError(f'cannot find the KV cache in a {type(output).__name__} output')


def layer_kv(cache) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """[(k, v)] per layer from a transformers Cache or a legacy tuple of pairs."""
    if hasattr(cache, 'layers'):
        pairs = [(getattr(layer, 'keys', None), getattr(layer, 'values', None)) for layer in cache.layers]
    elif hasattr(cache, 'key_cache'):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        if hasattr(cache, 'to_legacy_cache'):
            cache = cache.to_legacy_cache()
        if not isinstance(cache, (tuple, list)):
            raise CalibrationError(f'unsupported KV cache type {type(cache).__name__}')
        pairs = [(entry[0], entry[1]) for entry in cache]
    for i, (k, v) in enumerate(pairs):
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            raise CalibrationError(f'layer {i} of the KV cache holds no K/V tensors')
    return pairs


def _check_layout(layer: int, k: torch.Tensor, v: torch.Tensor, batch: int, tokens: int) -> None:
    for name, x in (('K', k), ('V', v)):
        if x.dim() != 4 or x.shape[0] != batch or x.shape[2] != tokens:
            raise CalibrationError(f'layer {layer}: {name} has shape {tuple(x.shape)}, expected '
                                   f'[batch {batch}, kv_heads, tokens {tokens}, head_dim]')


@torch.no_grad()
def observe_sample(base: nn.Module, input_ids: torch.Tensor, observer: KVObserver) -> None:
    """One forward of `input_ids` [batch, tokens]; every layer's K and V go to `observer`."""
    output = base(input_ids=input_ids, use_cache=True)
    for layer, (k, v) in enumerate(layer_kv(output_cache(output))):
        _check_layout(layer, k, v, *input_ids.shape)
        observer.observe(layer, k, v)


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (logits are not needed), when the model has one."""
    base = getattr(model, 'base_model', None)
    return base if isinstance(base, nn.Module) else model


def calibrate(model: nn.Module, samples: Sequence[Sequence[int]], device, offload: bool = False,
              progress: Iterable = None) -> KVObserver:
    """Observe K/V over `samples` (token id lists, one forward each, batch 1).

    The model is moved to `device`; with `offload` its decoder layers stay on the CPU and visit
    the device one at a time (`memory_efficient_inference`). `progress` wraps the sample loop
    (e.g. `functools.partial(tqdm, desc='Calibrating: ')`).
    """
    from lmdeploy.lite.utils.memory_efficient import memory_efficient_inference
    device = torch.device(device)
    model.eval()
    observer = KVObserver()
    rows = samples if progress is None else progress(samples)
    if offload:
        placed = memory_efficient_inference(model, device)
    else:
        placed = nullcontext(model.to(device))
    with placed:
        base = base_model(model)
        for ids in rows:
            observe_sample(base, torch.tensor([list(ids)], device=device), observer)
    return observer
