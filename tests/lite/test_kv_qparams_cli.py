"""`python -m lmdeploy.lite.apis.kv_qparams` in a subprocess: a deployed TP-2 GQA workspace gets
the same files as the in-process run and `--set_quant_policy` edits only its config.ini keys;
bad input is a one-line error with a non-zero exit and writes nothing."""
import os
import shutil
import subprocess
import sys

import pytest

from lmdeploy.lite.apis.kv_qparams import kv_qparams
from tests.turbomind.conftest import workspace  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST = ['--calib_samples', '2', '--max_seq_len', '32', '--device', 'cpu']


def cli(*args, env=None):
    return subprocess.run([sys.executable, '-m', 'lmdeploy.lite.apis.kv_qparams', *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def ws_tp2(workspace, tmp_path):  # noqa: F811
    """A private copy of the deployed gqa workspace with tp=2 (its config.ini gets edited)."""
    dst = tmp_path / 'workspace'
    shutil.copytree(workspace('gqa', tp=2), dst, symlinks=True)
    return dst


def test_cli_writes_the_scales_and_turns_int8_on(make_ckpt, ws_tp2, tmp_path):
    model, weights = make_ckpt('gqa'), ws_tp2 / 'triton_models' / 'weights'
    before = set(os.listdir(weights))
    config = (weights / 'config.ini').read_text()
    out = cli('--model', model, '--output_dir', weights, '--num_tp', 2, '--symmetry', False,
              '--granularity', 'per_head', '--set_quant_policy', *FAST)
    assert out.returncode == 0, out.stderr
    assert 'Calibrating: ' in out.stderr
    assert 'Layer 1 TP 1 KV scales&zeros done.' in out.stdout

    new = sorted(set(os.listdir(weights)) - before)
    assert new == sorted(f'layers.{i}.past_kv_scale.{t}.{kind}weight'
                         for i in range(2) for t in range(2) for kind in ('', 'per_head.'))
    # Same bytes as the in-process run with the same options.
    ref = tmp_path / 'ref'
    kv_qparams(str(model), symmetry=False, granularity='per_head', num_tp=2, calib_samples=2,
               max_seq_len=32, device='cpu', output_dir=str(ref), progress=False)
    for name in new:
        assert (weights / name).read_bytes() == (ref / name).read_bytes(), name
    assert (weights / 'config.ini').read_text() == config.replace(
        'quant_policy = 0\n', 'quant_policy = 4\n').replace(
        'tensor_para_size = 2\n', 'tensor_para_size = 2\nkv_int8_scales = per_head\n')


def test_cli_errors_are_one_line_and_write_nothing(make_ckpt, ws_tp2, tmp_path):
    model, weights = make_ckpt('gqa'), ws_tp2 / 'triton_models' / 'weights'
    listing = sorted(os.listdir(weights))
    config = (weights / 'config.ini').read_text()
    fresh = tmp_path / 'fresh' / 'weights'
    offline = {'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
    cases = [
        (('--model', model, '--output_dir', weights, '--num_tp', 1), 2,
         'does not match the workspace: ' + str(weights) + '/config.ini has tensor_para_size = 2'),
        (('--model', tmp_path / 'missing', '--output_dir', fresh), 2, 'model path not found'),
        (('--model', model, '--output_dir', fresh, '--calib_dataset', 'c4', *FAST), 1,
         '--calib_dataset builtin'),
        (('--model', model, '--output_dir', ws_tp2, '--num_tp', 2), 2, 'is a workspace'),
        (('--model', model, '--output_dir', fresh, '--set_quant_policy'), 2, 'has no config.ini'),
        (('--model', model, '--output_dir', fresh, '--bits', 4), 2, '--bits must be 8'),
        (('--model', model, '--output_dir', fresh, '--calib_samples', 0), 2, '--calib_samples must be'),
        (('--model', model, '--output_dir', fresh, '--calib_dataset', 'nowhere.txt'), 2,
         'neither a dataset'),
    ]
    for args, code, message in cases:
        out = cli(*args, env=offline)
        assert out.returncode == code, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (args, out.stderr)
    assert sorted(os.listdir(weights)) == listing
    assert (weights / 'config.ini').read_text() == config
    assert not (tmp_path / 'fresh').exists()


def test_engine_loads_the_calibrated_files(make_ckpt, ws_tp2):
    """The two sides of the int8-KV contract meet: the engine's reader gives back these files'
    values for every runtime rank (symmetric files: zero-points 0)."""
    kv_scales = pytest.importorskip('lmdeploy.turbomind.kv_scales')
    from lmdeploy.lite.quantization.scale_files import read_scale_file, scale_file_name
    from lmdeploy.turbomind.config import EngineConfig
    weights = ws_tp2 / 'triton_models' / 'weights'
    kv_qparams(str(make_ckpt('gqa')), output_dir=str(weights), num_tp=2, granularity='per_head',
               set_quant_policy=True, calib_samples=2, max_seq_len=32, device='cpu', progress=False)
    cfg = EngineConfig.from_workspace(str(ws_tp2))
    assert (cfg.quant_policy, cfg.kv_int8_scales) == (4, 'per_head')
    for per_head, mode in ((False, 'per_tensor'), (True, 'per_head')):
        files = [[read_scale_file(str(weights / scale_file_name(i, t, per_head))) for t in range(2)]
                 for i in range(2)]
        whole = kv_scales.load_kv_scales(cfg, 0, 1, mode)  # one runtime rank: both file ranks
        assert tuple(whole.shape) == (2, 4, 2)
        for i in range(2):
            for t in range(2):
                k, v = files[i][t]  # one KV head per file rank: 2 floats either way
                assert whole[i, :, t].tolist() == [k, 0.0, v, 0.0]
