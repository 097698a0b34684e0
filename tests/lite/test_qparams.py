"""The qparams formulas, the observer and the scale-file arrays on synthetic K/V, against numpy
computations of the int8-KV contract; the atomic file set and the config.ini edit."""
import os

import numpy as np
import pytest
import torch

from lmdeploy.lite.quantization.observer import KVObserver
from lmdeploy.lite.quantization.qparams import kv_qparams
from lmdeploy.lite.quantization.scale_files import (read_scale_file, scale_arrays, scale_file_name,
                                                    write_scale_files)
from lmdeploy.lite.utils.workspace_config import read_config, set_config_keys
from tests.lite.conftest import expected_files


def random_kv(gen, layers=3, batch=1, heads=4, tokens=7, dim=8):
    """K/V per layer with a different range per head (so per-head and per-tensor differ)."""
    spread = torch.arange(1, heads + 1, dtype=torch.float32).view(1, heads, 1, 1)
    return [(torch.randn(batch, heads, tokens, dim, generator=gen) * spread + 0.3,
             torch.randn(batch, heads, tokens, dim, generator=gen) * spread.flip(1) - 0.2)
            for _ in range(layers)]


@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('num_tp', [1, 2, 4])
def test_scale_arrays_equal_the_contract_over_all_samples(symmetric, num_tp):
    gen = torch.Generator().manual_seed(0)
    samples = [random_kv(gen) for _ in range(3)]
    observer = KVObserver()
    for sample in samples:
        for layer, (k, v) in enumerate(sample):
            observer.observe(layer, k, v)
    arrays = scale_arrays(observer, num_tp, symmetric, per_head=True)
    k_layers = [np.concatenate([s[i][0].numpy() for s in samples]) for i in range(3)]
    v_layers = [np.concatenate([s[i][1].numpy() for s in samples]) for i in range(3)]
    expected = expected_files(k_layers, v_layers, num_tp, symmetric)
    assert sorted(arrays) == sorted(expected)
    for name, want in expected.items():
        assert arrays[name].dtype == np.float32
        np.testing.assert_allclose(arrays[name], want, rtol=1e-6, err_msg=name)
    # The per-tensor file is 2 (or 4) floats; the per-head one [2 (4), h].
    rows = 2 if symmetric else 4
    assert arrays[scale_file_name(0, 0)].shape == (rows,)
    assert arrays[scale_file_name(0, 0, per_head=True)].shape == (rows, 4 // num_tp)


def test_scales_are_clamped_and_quantize_within_half_a_step():
    zeros = torch.zeros(3)
    assert kv_qparams(zeros, zeros, zeros, zeros, True).tolist() == [[pytest.approx(1e-5)] * 3] * 2
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3 + 1
    for symmetric in (True, False):
        rows = kv_qparams(x.min()[None], x.max()[None], x.min()[None], x.max()[None], symmetric)
        scale = rows[0, 0]
        zp = 0.0 if symmetric else rows[1, 0]
        q = torch.clamp(torch.round((x - zp) / scale), -128, 127)
        err = (q * scale + zp - x).abs().max()
        # Asymmetric: max maps onto 127.5, clamped to 127, so the top value is off by one step.
        assert err <= scale * (0.5 if symmetric else 1.0) + 1e-6


def test_observer_rejects_a_changing_head_count():
    observer = KVObserver()
    observer.observe(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match='KV heads'):
        observer.observe(0, torch.zeros(1, 4, 3, 4), torch.zeros(1, 4, 3, 4))


def test_scale_files_are_written_as_one_set(tmp_path):
    out = tmp_path / 'new' / 'weights'
    arrays = {scale_file_name(0, 0): np.array([1.5, 2.5], np.float32),
              scale_file_name(1, 0): np.array([3.0, 4.0, 5.0, 6.0], np.float32)}
    written = write_scale_files(str(out), arrays)
    assert sorted(os.path.basename(p) for p in written) == sorted(arrays)
    assert (out / scale_file_name(0, 0)).read_bytes() == np.array([1.5, 2.5], '<f4').tobytes()
    assert read_scale_file(str(out / scale_file_name(1, 0))).tolist() == [3, 4, 5, 6]

    # A failure while placing the set (a directory in the way of the second file) removes what
    # this call wrote, and the folders it created.
    fresh = tmp_path / 'fresh' / 'weights'
    blocked = {**arrays, 'zz.blocked': np.zeros(2, np.float32)}
    os.makedirs(fresh.parent)
    (fresh.parent / 'keep').write_text('x')
    os.makedirs(fresh / 'zz.blocked' / 'child')
    with pytest.raises(OSError):
        write_scale_files(str(fresh), blocked)
    assert sorted(os.listdir(fresh)) == ['zz.blocked']
    gone = tmp_path / 'gone' / 'weights'
    with pytest.raises(TypeError):
        write_scale_files(str(gone), {'a.weight': np.zeros(2, np.float32), 'b.weight': object()})
    assert not (tmp_path / 'gone').exists()


def test_set_config_keys_changes_only_those_lines(tmp_path):
    ini = tmp_path / 'config.ini'
    text = ('[llama]\nmodel_name = llama\n# a comment\nquant_policy = 0\ntensor_para_size = 2\n\n'
            '[other]\nquant_policy = 7\n')
    ini.write_text(text)
    os.chmod(ini, 0o640)
    set_config_keys(str(ini), {'quant_policy': '4', 'kv_int8_scales': 'per_head'})
    assert ini.read_text() == text.replace('quant_policy = 0\ntensor_para_size = 2\n',
                                           'quant_policy = 4\ntensor_para_size = 2\n'
                                           'kv_int8_scales = per_head\n')
    assert os.stat(ini).st_mode & 0o777 == 0o640
    assert read_config(str(ini))['kv_int8_scales'] == 'per_head'
    assert sorted(os.listdir(tmp_path)) == ['config.ini']
