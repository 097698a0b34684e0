"""Run a model whose decoder layers stay in host memory: each layer moves to the device for its
own forward and back afterwards, so the device holds one layer's weights at a time (plus the
embedding, the final norm and the activations). LMDeploy v0.0.2's `--offload`, working.
"""
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList as long as `num_hidden_layers`,
    else the ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f'{type(model).__name__} has no list of decoder layers to offload')
    n = getattr(getattr(model, 'config', None), 'num_hidden_layers', None)
    exact = [m for m in lists if len(m) == n]
    candidates = exact or lists
    return max(candidates, key=lambda m: sum(p.numel() for p in m.parameters()))


def _to_device_except(module: nn.Module, keep: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer of `module` to `device`, except those inside `keep`."""
    if module is keep:
        return
    if not any(m is keep for m in module.modules()):
        module.to(device)
        return
    for name, p in module.named_parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        module._buffers[name] = b.to(device)
    for child in module.children():
        _to_device_except(child, keep, device)


@contextmanager
def memory_efficient_inference(model: nn.Module, device) -> Iterator[nn.Module]:
    """Inside the block `model` runs on `device` with its decoder layers offloaded (see the
    module docstring); the layers are moved by forward hooks, which are removed on exit."""
    device = torch.device(device)
    layers = decoder_layers(model)
    layers.to('cpu')
    _to_device_except(model, layers, device)

    def bring(layer, args):
        layer.to(device)

    def send_back(layer, args, output):
        layer.to('cpu')

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(bring))
        handles.append(layer.register_forward_hook(send_back))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
