"""Kernels of the data plane: one file per op; this module is the one place that picks the
implementation for a device.

Each op file defines ``<op>_ref``, a torch reference that runs anywhere, and may define
``<op>_triton`` with the same signature (the GPU issue adds those), or ``<op>_cuda`` where a
CUDA library kernel does the job (torch's fused SDPA for `prompt_attention`). ``select(device)`` returns a
`Kernels` object whose attributes are the chosen functions:

    rms_norm(x, weight, eps, residual=None) -> out | (out, new_residual)
    rotary_embedding(q, k, positions, rotary_dim, theta) -> (q, k)
    store_kv(k, v, k_cache, v_cache, slot_mapping, kv_qparams=None) -> None
    rotary_store_kv(q, k, v, positions, rotary_dim, theta, k_cache, v_cache, slot_mapping,
                    kv_qparams=None) -> q     (rotary_embedding then store_kv, one launch)
    paged_attention(q, k_cache, v_cache, block_table, cu_seqlens, kv_lens, scale,
                    max_q_len=0, max_kv_len=0, kv_qparams=None) -> out
    silu_and_mul(x) -> out
    prompt_attention(q, k, v, scale) -> out    (one fresh prompt, causal over its own tokens)
    sample_tokens(logits, bad_ids=None, temperature=None, greedy=None, uniform=None) -> ids
                                                (the sampler's last step: argmax or one draw)
    linear(x, w) -> x @ w      w: [K, N], or output.t() for the LM head (Triton: small M only)

Choice: the Triton version on CUDA when it exists and triton imports, else the CUDA one on
CUDA; the reference otherwise.
``LMDEPLOY_KERNELS=reference`` (or ``select(device, impl='reference')``) forces the references,
e.g. to check a Triton kernel against its reference inside the full model.
kv_qparams: int8 KV cache parameters (None for a float cache), see kv_quant.py.
"""
import importlib
import os
import sys
from typing import Dict

import torch

OPS: Dict[str, str] = {  # op name -> module
    'rms_norm': 'rms_norm',
    'rotary_embedding': 'rotary',
    'store_kv': 'store_kv',
    'rotary_store_kv': 'rotary_store_kv',
    'paged_attention': 'paged_attention',
    'silu_and_mul': 'activation',
    'prompt_attention': 'prompt_attention',
    'sample_tokens': 'sample',
    'linear': 'linear',
}

from .activation import silu_and_mul_ref  # noqa: E402
from .linear import linear_ref  # noqa: E402
from .paged_attention import paged_attention_ref  # noqa: E402
from .prompt_attention import prompt_attention_ref  # noqa: E402
from .rms_norm import rms_norm_ref  # noqa: E402
from .rotary import rotary_embedding_ref  # noqa: E402
from .rotary_store_kv import rotary_store_kv_ref  # noqa: E402
from .sample import sample_tokens_ref  # noqa: E402
from .store_kv import store_kv_ref  # noqa: E402


class Kernels:
    """The chosen implementation of every op; `impl[op]` says which ('ref' or 'triton')."""

    def __init__(self, fns: Dict[str, object], impl: Dict[str, str]):
        self.impl = impl
        for name, fn in fns.items():
            setattr(self, name, fn)

    def __repr__(self):
        return 'Kernels(' + ', '.join(f'{k}={v}' for k, v in self.impl.items()) + ')'


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def select(device='cpu', impl: str = None) -> Kernels:
    """Kernels for `device`; impl: 'auto' (default), 'reference' or 'triton'."""
    device = torch.device(device)
    impl = impl or os.environ.get('LMDEPLOY_KERNELS', 'auto')
    if impl not in ('auto', 'reference', 'triton'):
        raise ValueError(f"kernel impl must be auto|reference|triton, got {impl!r}")
    want_triton = impl == 'triton' or (impl == 'auto' and device.type == 'cuda'
                                       and _triton_available())
    fns, chosen = {}, {}
    for op, module in OPS.items():
        mod = importlib.import_module(f'{__name__}.{module}')
        kind = 'ref'
        if want_triton and hasattr(mod, f'{op}_triton'):
            kind = 'triton'
        elif device.type == 'cuda' and impl != 'reference' and hasattr(mod, f'{op}_cuda'):
            kind = 'cuda'
        elif impl == 'triton' and not hasattr(mod, f'{op}_cuda'):
            raise RuntimeError(f'no Triton implementation of {op} (kernels/{module}.py)')
        fns[op] = getattr(mod, f'{op}_{kind}')
        chosen[op] = kind
    return Kernels(fns, chosen)


def compiled_variants() -> int:
    """How many compiled variants the Triton kernels of this package hold, all devices
    together (-1 when this Triton keeps them elsewhere). A count that grows while serving means
    a step met a new specialisation and waited for a compile."""
    total = 0
    for name, mod in list(sys.modules.items()):
        if not name.startswith(f'{__name__}.triton_') or mod is None:
            continue
        for obj in vars(mod).values():
            caches = getattr(obj, 'device_caches', None)
            if caches is None or not hasattr(obj, 'run'):
                continue
            try:
                total += sum(len(c[0]) for c in caches.values())
            except (TypeError, IndexError):
                return -1
    return total


__all__ = ['OPS', 'Kernels', 'select', 'compiled_variants', 'rms_norm_ref',
           'rotary_embedding_ref', 'store_kv_ref', 'rotary_store_kv_ref', 'paged_attention_ref',
           'silu_and_mul_ref', 'prompt_attention_ref', 'sample_tokens_ref', 'linear_ref']
