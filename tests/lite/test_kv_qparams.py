"""`kv_qparams` on the tiny fixture checkpoints: every scale file equals the contract's formulas
applied to transformers' own past keys/values over the same calibration windows (derived here
from the corpus with sentencepiece and random.Random(0)); TP slicing on GQA, the asymmetric
format, per-head files, offload."""
import os
import shutil

import numpy as np
import pytest

from lmdeploy.lite.apis.kv_qparams import kv_qparams
from lmdeploy.lite.quantization.scale_files import read_scale_file
from tests.lite.conftest import expected_files, hf_kv, windows

SEQLEN, SAMPLES = 48, 3


def run(model, out, **kwargs):
    kwargs = {'calib_samples': SAMPLES, 'max_seq_len': SEQLEN, 'device': 'cpu', 'progress': False, **kwargs}
    return kv_qparams(str(model), output_dir=str(out), **kwargs)


def check_files(out, expected, per_head):
    names = sorted(n for n in expected if per_head or '.per_head.' not in n)
    assert sorted(os.listdir(out)) == names
    for name in names:
        got = read_scale_file(os.path.join(out, name))
        np.testing.assert_allclose(got, expected[name].reshape(-1), rtol=2e-6, err_msg=name)


@pytest.mark.parametrize('variant, num_tp, symmetry', [
    ('gqa', 2, True),        # 2 KV heads over 2 ranks: one head per rank file
    ('gqa', 1, False),       # asymmetric, v0.0.4's 4 floats
    ('internlm', 2, False),  # MHA with q/k/v biases, 2 heads per rank
])
def test_scale_files_equal_transformers_statistics(make_ckpt, corpus_ids, tmp_path, capsys, variant,
                                                   num_tp, symmetry):
    model = make_ckpt(variant)
    out = tmp_path / 'weights'
    written = run(model, out, num_tp=num_tp, symmetry=symmetry, granularity='per_head')
    k, v = hf_kv(model, windows(corpus_ids, SAMPLES, SEQLEN))
    expected = expected_files(k, v, num_tp, symmetry)
    check_files(out, expected, per_head=True)
    assert len(written) == len(expected)
    stdout = capsys.readouterr().out
    assert stdout.startswith('Loading calibrate dataset ...\n')
    what = 'KV scales done.' if symmetry else 'KV scales&zeros done.'
    for layer in range(2):
        for tp in range(num_tp):
            assert f'Layer {layer} TP {tp} {what}\n' in stdout


def test_offload_gives_identical_files_and_per_tensor_drops_stale_per_head_files(make_ckpt, tmp_path):
    model = make_ckpt('gqa')
    plain, offloaded = tmp_path / 'plain', tmp_path / 'offloaded'
    run(model, plain, granularity='per_head')
    run(model, offloaded, granularity='per_head', offload=True)
    assert sorted(os.listdir(plain)) == sorted(os.listdir(offloaded))
    for name in os.listdir(plain):
        assert (plain / name).read_bytes() == (offloaded / name).read_bytes(), name
    # A per-tensor run over the same dir leaves no per-head files of the older calibration.
    run(model, plain, symmetry=False)
    assert sorted(os.listdir(plain)) == [f'layers.{i}.past_kv_scale.0.weight' for i in range(2)]
    assert all(read_scale_file(str(plain / n)).size == 4 for n in os.listdir(plain))


def test_scales_see_k_after_rotary(make_ckpt, corpus_ids, tmp_path):
    """The K statistic is of the rotated K: it differs from the k_proj output's."""
    import torch
    from transformers import AutoModelForCausalLM
    model = make_ckpt('gqa')
    out = tmp_path / 'w'
    run(model, out)
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    seen = []
    k_proj = hf.model.layers[0].self_attn.k_proj
    hook = k_proj.register_forward_hook(lambda m, i, o: seen.append(o.abs().max()))
    with torch.no_grad():
        for ids in windows(corpus_ids, SAMPLES, SEQLEN):
            hf(torch.tensor([ids]))
    hook.remove()
    pre_rotary = float(max(seen)) / 127
    k_scale = read_scale_file(str(out / 'layers.0.past_kv_scale.0.weight'))[0]
    assert abs(k_scale - pre_rotary) > 1e-4 * pre_rotary


def test_unloadable_models_are_one_line_errors_and_write_nothing(make_ckpt, tmp_path):
    from lmdeploy.console import CliError
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'config.json').write_text('{"model_type": "no-such-architecture"}')
    no_weights = tmp_path / 'no_weights'
    shutil.copytree(make_ckpt('gqa'), no_weights, ignore=shutil.ignore_patterns('*.safetensors*'))
    for model, message in ((broken, 'cannot load the model config from'),
                           (no_weights, 'cannot load the model from')):
        out = tmp_path / 'out' / 'weights'
        with pytest.raises(CliError) as e:
            run(model, out)
        assert message in str(e.value) and '\n' not in str(e.value)
        assert not (tmp_path / 'out').exists()
