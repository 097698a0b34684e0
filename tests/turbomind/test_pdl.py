"""kernels/pdl.py on the host: the decode-step scope nests, is per thread, and never turns PDL
on for a CPU device or in the Triton interpreter (the GPU half is tests/gpu/test_pdl_gpu.py)."""
import threading

import torch

from lmdeploy.turbomind.kernels import pdl


def _decode_only():
    return getattr(pdl._STEP, 'decode_only', False)


def test_scope_nests_and_restores():
    assert not _decode_only()
    with pdl.decode_scope(True):
        assert _decode_only()
        with pdl.decode_scope(False):
            assert not _decode_only()
        assert _decode_only()
    assert not _decode_only()


def test_scope_restores_after_an_error():
    try:
        with pdl.decode_scope(True):
            raise RuntimeError('boom')
    except RuntimeError:
        pass
    assert not _decode_only()


def test_scope_is_per_thread():
    seen = []
    inside, release = threading.Event(), threading.Event()

    def other():
        with pdl.decode_scope(True):
            inside.set()
            release.wait(10)
            seen.append(_decode_only())

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    seen.append(_decode_only())  # this thread is not inside the other's scope
    release.set()
    t.join(10)
    assert seen == [False, True]


def test_no_pdl_on_cpu():
    with pdl.decode_scope(True):
        assert pdl.launch_opts(torch.device('cpu')) == {'USE_PDL': False}
    assert not pdl.pdl_enabled(torch.device('cpu'))
