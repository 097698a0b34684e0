"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels of a step.

A decode step is ~300 small launches; between two dependent kernels the GPU idles ~1.4 us
(0.42 ms of a 5.9 ms bs1 step on the H100). With PDL a kernel is launched while its
predecessor still runs: it may read data nobody writes during the step (weights) at once, then
``pdl_enter`` waits until the predecessor has finished and its writes are visible, and lets the
next kernel launch in turn. A CUDA graph captures these launches as programmatic edges.

Rules every kernel that takes ``USE_PDL`` follows, so that waiting on the predecessor alone is
enough (its predecessor finished before it passed its own wait):
* before ``pdl_enter``: loads of weights only, no stores, no early return;
* every program calls ``pdl_enter`` (kernels that return early do it first).
A kernel that is not launched with PDL (torch, cuBLAS) serialises as usual; the wait is a
no-op after it.

Only decode-only steps use it (the model opens ``decode_scope`` when every row has one new
token). On the H100, B1's decode step went 5.56 -> 5.44 ms with it, but a 128-token prompt's
step 6.00 -> 6.56 ms (graph replays; NOTES.md, session 8), so steps with prompt rows launch as
before.

``LMDEPLOY_PDL=0`` turns it off (A/B runs); it is on where the GPU (sm_90+) and Triton
(``gdc_wait``, ``launch_pdl``) support it, never in the interpreter.
"""
import contextlib
import os
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: only decode_scope is used (by the model)
    triton = tl = None

_ENABLED = {}
_STEP = threading.local()  # .decode_only: set by decode_scope around a decode-only forward


def _triton_has_pdl() -> bool:
    if tl is None:
        return False
    cuda = getattr(getattr(tl, 'extra', None), 'cuda', None)
    return cuda is not None and hasattr(cuda, 'gdc_wait') and hasattr(cuda,
                                                                      'gdc_launch_dependents')


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (cached per device)."""
    if device.type != 'cuda':
        return False
    on = _ENABLED.get(device.index)
    if on is None:
        on = (os.environ.get('LMDEPLOY_PDL', '1') != '0'
              and os.environ.get('TRITON_INTERPRET') != '1' and _triton_has_pdl()
              and torch.cuda.get_device_capability(device)[0] >= 9)
        _ENABLED[device.index] = on
    return on


@contextlib.contextmanager
def decode_scope(decode_only: bool):
    """Kernels launched inside use PDL when `decode_only` (and the device supports it)."""
    saved = getattr(_STEP, 'decode_only', False)
    _STEP.decode_only = bool(decode_only)
    try:
        yield
    finally:
        _STEP.decode_only = saved


def launch_opts(device: torch.device) -> dict:
    """Launch keywords of a kernel that takes USE_PDL: pass as ``**launch_opts(dev)``."""
    if getattr(_STEP, 'decode_only', False) and pdl_enabled(device):
        return {'USE_PDL': True, 'launch_pdl': True}
    return {'USE_PDL': False}


if triton is not None:
    @triton.jit
    def pdl_enter(USE_PDL: tl.constexpr):
        """Wait for the previous kernel's writes, then let the next kernel launch."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
