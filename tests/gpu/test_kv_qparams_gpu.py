"""kv_qparams on a CUDA GPU against the CPU run, and --offload on the GPU.

Skips without CUDA. On the lent H100:  python3 -m pytest -q tests/gpu/test_kv_qparams_gpu.py
"""
import os

import numpy as np
import pytest
import torch

from lmdeploy.lite.apis.kv_qparams import kv_qparams
from lmdeploy.lite.quantization.scale_files import read_scale_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

FAST = dict(calib_samples=4, max_seq_len=256, progress=False)


def calibrate(model, out, **kwargs):
    kv_qparams(str(model), output_dir=str(out), **{**FAST, **kwargs})
    return {name: read_scale_file(os.path.join(out, name)) for name in sorted(os.listdir(out))}


def assert_close(got, want, rtol):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=1e-6, err_msg=name)


@pytest.mark.parametrize('variant, symmetry', [('gqa', True), ('internlm', False), ('head128', True)])
def test_cuda_fp32_equals_cpu(make_ckpt, tmp_path, variant, symmetry):
    model = make_ckpt(variant)
    options = dict(symmetry=symmetry, granularity='per_head', dtype='fp32')
    cpu = calibrate(model, tmp_path / 'cpu', device='cpu', **options)
    gpu = calibrate(model, tmp_path / 'gpu', device='cuda', **options)
    assert_close(gpu, cpu, rtol=1e-3)


def test_cuda_fp16_default_is_close_to_fp32(make_ckpt, tmp_path):
    model = make_ckpt('gqa')
    fp32 = calibrate(model, tmp_path / 'fp32', device='cpu', granularity='per_head')
    fp16 = calibrate(model, tmp_path / 'fp16', device='cuda', granularity='per_head')  # dtype auto
    assert_close(fp16, fp32, rtol=2e-2)


def test_offload_on_cuda_gives_the_same_files_with_one_layer_on_the_device(make_ckpt, tmp_path):
    # 8 layers of 16.8M parameters (67 MB in fp32 each): with offload the GPU holds one at a time.
    model = make_ckpt('llama', hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=4096, num_hidden_layers=8)
    peaks = {}
    files = {}
    for offload in (True, False):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        files[offload] = calibrate(model, tmp_path / f'offload{offload}', device='cuda',
                                   dtype='fp32', offload=offload)
        peaks[offload] = torch.cuda.max_memory_allocated() - base
    assert_close(files[True], files[False], rtol=1e-6)
    layer_bytes = 16.8e6 * 4
    assert peaks[False] > 8 * layer_bytes
    assert peaks[True] < 3 * layer_bytes, peaks
