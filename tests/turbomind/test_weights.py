"""Weight loading: strict sizes, clear errors, runtime re-slicing across tp."""
import os
import shutil

import pytest
import torch

from lmdeploy.turbomind.config import EngineConfig
from lmdeploy.turbomind.model_runner import ModelRunner
from lmdeploy.turbomind.weights import WeightError, load_weights


def copy_ws(ws, tmp_path):
    dst = tmp_path / 'ws'
    shutil.copytree(ws, dst, symlinks=True)
    return dst, dst / 'triton_models' / 'weights'


def test_shapes_and_dtype(workspace):
    cfg = EngineConfig.from_workspace(workspace('internlm'), device='cpu', dtype='bf16')
    w = load_weights(cfg)
    assert w.tok_embeddings.shape == (2048, 64) and w.output.shape == (2048, 64)
    layer = w.layers[1]
    assert layer.w_qkv.shape == (64, 3 * 64) and layer.b_qkv.shape == (3 * 64,)
    assert layer.wo.shape == (64, 64) and layer.b_o.shape == (64,)
    assert layer.w13.shape == (64, 256) and layer.w2.shape == (128, 64)
    assert layer.w13.dtype == torch.bfloat16
    gqa = load_weights(EngineConfig.from_workspace(workspace('gqa'), device='cpu'))
    assert gqa.layers[0].w_qkv.shape == (64, 64 + 2 * 32) and gqa.layers[0].b_qkv is None


def test_missing_file_is_an_error(workspace, tmp_path):
    ws, wdir = copy_ws(workspace('gqa'), tmp_path)
    os.remove(wdir / 'layers.1.feed_forward.w2.0.weight')
    cfg = EngineConfig.from_workspace(ws, device='cpu')
    with pytest.raises(WeightError, match=r'layers\.1\.feed_forward\.w2\.0\.weight is missing'):
        load_weights(cfg)
    with pytest.raises(WeightError):
        ModelRunner(cfg)


def test_wrong_size_is_an_error(workspace, tmp_path):
    ws, wdir = copy_ws(workspace('gqa'), tmp_path)
    path = wdir / 'layers.0.attention.w_qkv.0.weight'
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    cfg = EngineConfig.from_workspace(ws, device='cpu')
    n = 64 * 128
    with pytest.raises(WeightError, match=rf'{len(data) - 2} bytes .*needs {n} elements'):
        load_weights(cfg)
    path.write_bytes(data + data[:2])
    with pytest.raises(WeightError, match='w_qkv'):
        load_weights(cfg)
    # a config that disagrees with the files (e.g. wrong inter_size) is caught the same way
    with pytest.raises(WeightError, match='w1'):
        load_weights(EngineConfig.from_workspace(workspace('gqa'), inter_size=64, device='cpu'))


def _same(a, b):
    for name in ('tok_embeddings', 'norm', 'output'):
        assert torch.equal(getattr(a, name), getattr(b, name))
    for la, lb in zip(a.layers, b.layers):
        for key, t in vars(la).items():
            if t is None:
                assert getattr(lb, key) is None
            else:
                assert torch.equal(t, getattr(lb, key)), key


@pytest.mark.parametrize('variant', ['gqa', 'internlm'])
def test_runtime_tp_reslicing(workspace, variant):
    one = EngineConfig.from_workspace(workspace(variant, tp=1), device='cpu')
    two = EngineConfig.from_workspace(workspace(variant, tp=2), device='cpu')
    _same(load_weights(two, 0, tp=1), load_weights(one, 0, tp=1))  # merge disk ranks
    for r in range(2):
        _same(load_weights(one, r, tp=2), load_weights(two, r, tp=2))  # split at load
    with pytest.raises(ValueError):
        load_weights(one, 2, tp=2)
