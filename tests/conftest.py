"""Shared pytest fixtures.

`make_ckpt(variant='gqa', fmt='safetensors', dtype=torch.float32, shards=None, seed=0,
rope_freqs=False, **overrides) -> Path` builds (once per session, cached) a tiny checkpoint;
see `tests/fixtures/checkpoints.py` for variants, formats and the weight recipe.
"""
import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.fixtures import TOKENIZER_MODEL, make_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_switch_interval():
    """An engine planning just in time lowers the process's GIL switch interval (engine.py):
    keep that to the test that did it."""
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)


@pytest.fixture(scope='session')
def ckpt_root(tmp_path_factory):
    """Session-wide cache directory of the tiny checkpoints."""
    return tmp_path_factory.mktemp('checkpoints')


@pytest.fixture(scope='session')
def make_ckpt(ckpt_root):
    """`make_ckpt(variant, fmt, dtype, ...) -> Path` (see the module docstring)."""
    return functools.partial(make_checkpoint, ckpt_root)


@pytest.fixture(scope='session')
def tokenizer_model():
    """Path of the project's sentencepiece tokenizer (2000 pieces, bos 1, eos 2)."""
    return str(TOKENIZER_MODEL)
