"""int8 KV cache (quant_policy=4) in the engine, on CPU fp32 with the fixture models.

The scale files are computed here, independently of the engine and of the calibration CLI,
from transformers' past_key_values (K after rotary) over a few seeded prompts; the int8 engine
is compared with the same engine on fp32 KV: 128 decode steps, teacher-forced on the fp32 run's
greedy tokens.
"""
import configparser
import glob
import os
import os.path as osp
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmdeploy.turbomind.config import ConfigError, EngineConfig
from lmdeploy.turbomind.kv_cache import KVCache
from lmdeploy.turbomind.kv_scales import KVScaleError, load_kv_scales, scale_file
from lmdeploy.turbomind.model_runner import ModelRunner
from lmdeploy.turbomind.step_input import RowPlan, build_step_input

STEPS = 128
BLOCK = 8


# ------------------------------------------------------------------ independent calibration
def kv_stats(model, prompts):
    """Per layer, [3, hkv] tensors for K and V: (min, max, absmax) over every prompt's tokens
    and head dims, from transformers' cache (K after rotary)."""
    stats = None
    with torch.no_grad():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            cache = out.cache if hasattr(out, 'cache') else out.past_key_values
            layers = [(lay.keys, lay.values) for lay in cache.layers]
            cur = [[torch.stack([x.amin((0, 2, 3)), x.amax((0, 2, 3)), x.abs().amax((0, 2, 3))])
                    for x in kv] for kv in layers]  # x: [1, hkv, T, D]
            if stats is None:
                stats = cur
            else:
                for old, new in zip(stats, cur):
                    for j in range(2):
                        old[j] = torch.stack([torch.minimum(old[j][0], new[j][0]),
                                              torch.maximum(old[j][1], new[j][1]),
                                              torch.maximum(old[j][2], new[j][2])])
    return stats


def qparams(st, symmetric):
    """(scale, zp) of one [3, n] (min, max, absmax) statistic."""
    if symmetric:
        return (st[2] / 127).clamp_min(1e-5), torch.zeros_like(st[2])
    return ((st[1] - st[0]) / 255).clamp_min(1e-5), (st[1] + st[0]) / 2


def write_scales(weight_dir, stats, num_tp=1, symmetric=True, per_head=False):
    """The contract's files: per TP slice of KV heads, per layer."""
    for i, (k, v) in enumerate(stats):
        h = k.shape[1] // num_tp
        for r in range(num_tp):
            sl = slice(r * h, (r + 1) * h)
            ks, vs = k[:, sl], v[:, sl]
            if not per_head:  # statistic over the whole slice
                ks = torch.stack([ks[0].min(), ks[1].max(), ks[2].max()])[:, None]
                vs = torch.stack([vs[0].min(), vs[1].max(), vs[2].max()])[:, None]
            (k_s, k_z), (v_s, v_z) = qparams(ks, symmetric), qparams(vs, symmetric)
            rows = [k_s, v_s] if symmetric else [k_s, k_z, v_s, v_z]
            data = torch.stack(rows).float().numpy().astype('<f4')
            data.tofile(scale_file(weight_dir, i, r, per_head))


def prompt(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 2000, (n - 1,), generator=g).tolist()


CALIB = [prompt(64, 100 + s) for s in range(4)]


@pytest.fixture(scope='module')
def int8_ws(workspace, hf_model, tmp_path_factory):
    """`int8_ws(variant, tp=1, symmetric=True, per_head=False) -> workspace copy` with scale
    files (and quant_policy = 4 in config.ini)."""
    root = tmp_path_factory.mktemp('int8_ws')
    cache = {}

    def get(variant='gqa', tp=1, symmetric=True, per_head=False):
        key = (variant, tp, symmetric, per_head)
        if key not in cache:
            dst = str(root / '-'.join(map(str, key)))
            shutil.copytree(workspace(variant, tp=tp), dst)
            wdir = osp.join(dst, 'triton_models', 'weights')
            write_scales(wdir, kv_stats(hf_model(variant), CALIB), tp, symmetric, per_head)
            set_ini(dst, quant_policy=4)
            cache[key] = dst
        return cache[key]

    return get


def set_ini(ws, **keys):
    ini = osp.join(ws, 'triton_models', 'weights', 'config.ini')
    parser = configparser.ConfigParser()
    parser.read(ini)
    for k, v in keys.items():
        parser.set('llama', k, str(v))
    with open(ini, 'w') as f:
        parser.write(f)


def make_runner(ws, **kw):
    kw.setdefault('num_blocks', 40)
    cfg = EngineConfig.from_workspace(ws, block_size=BLOCK, device='cpu', dtype='fp32', **kw)
    return ModelRunner(cfg)


# ------------------------------------------------------------------ decode 128 steps
def decode_logits(runner, ids, forced=None, steps=STEPS):
    """Prefill `ids`, then `steps` decode steps fed with `forced` tokens (or the argmax):
    ([steps, V] logits of each decode input's prediction, the fed tokens)."""
    blocks = list(range(-(-(len(ids) + steps) // BLOCK)))[::-1]
    logits = runner.run(build_step_input([RowPlan(ids, 0, blocks)], BLOCK))[0]
    out, fed, n = [], [], len(ids)
    for t in range(steps):
        tok = int(logits.argmax()) if forced is None else forced[t]
        fed.append(tok)
        logits = runner.run(build_step_input([RowPlan([tok], n, blocks)], BLOCK))[0]
        out.append(logits)
        n += 1
    return torch.stack(out), fed


@pytest.fixture(scope='module')
def fp32_reference(workspace):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = decode_logits(make_runner(workspace(variant)), prompt(16, 7))
        return cache[variant]
    return get


def _compare(runner, reference):
    ref_logits, tokens = reference
    got, _ = decode_logits(runner, prompt(16, 7), forced=tokens)
    agree = float((got.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    rel = float(((got - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).max())
    return agree, rel


MODES = [('per_tensor', True), ('per_tensor', False), ('per_head', True), ('per_head', False),
         ('online', None)]


@pytest.mark.parametrize('variant', ['gqa', 'head128'])
@pytest.mark.parametrize('mode,symmetric', MODES)
def test_int8_matches_fp32_kv(int8_ws, workspace, fp32_reference, variant, mode, symmetric):
    ws = workspace(variant) if mode == 'online' else int8_ws(
        variant, symmetric=symmetric, per_head=mode == 'per_head')
    runner = make_runner(ws, quant_policy=4, kv_int8_scales=mode)
    assert runner.kv_cache.pool.dtype == torch.int8
    agree, rel = _compare(runner, fp32_reference(variant))
    print(f'{variant} {mode} sym={symmetric}: greedy agreement {agree:.3f}, max rel err {rel:.4f}')
    assert agree >= 0.95, agree
    assert rel < 0.05, rel


def test_int8_really_quantises(workspace, fp32_reference):
    """The int8 path changes the logits (it is not silently fp32), by far less than noise."""
    runner = make_runner(workspace('gqa'), quant_policy=4, kv_int8_scales='online')
    agree, rel = _compare(runner, fp32_reference('gqa'))
    assert 0 < rel
    assert runner.kv_cache.scale_pool.abs().sum() > 0


def test_use_context_fmha_changes_nothing(int8_ws):
    ws = int8_ws('gqa')
    ids = prompt(20, 3)
    out = []
    for fmha in (0, 1):
        runner = make_runner(ws, quant_policy=4, use_context_fmha=fmha)
        step = build_step_input([RowPlan(ids, 0, list(range(3)), 'all')], BLOCK)
        out.append(runner.run(step))
    assert torch.equal(out[0], out[1])


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize('mode', ['per_tensor', 'per_head', 'online'])
def test_block_costs_half_and_plan_doubles(workspace, mode):
    fp = EngineConfig.from_workspace(workspace('head128'), dtype='fp16', device='cpu')
    q8 = EngineConfig.from_workspace(workspace('head128'), dtype='fp16', device='cpu',
                                     quant_policy=4, kv_int8_scales=mode)
    b16, b8 = KVCache.bytes_per_block(fp), KVCache.bytes_per_block(q8)
    D = fp.size_per_head
    want = b16 // 2 if mode != 'online' else b16 // 2 * (D + 4) // D
    assert b8 == want
    # the pool allocates what the plan counted
    kv = KVCache.from_config(q8, 3, kv_scales=torch.ones(q8.num_layer, 4, q8.kv_head_num))
    assert kv.pool.dtype == torch.int8 and kv.nbytes() - (
        kv.kv_scales.numel() * 4 if kv.kv_scales is not None else 0) == 3 * b8
    # the GPU memory plan (cache_max_entry_count <= 1: a fraction of free memory)
    free = 64 * b16

    def plan(cfg):
        fake = SimpleNamespace(cfg=cfg, tp=1, dtype=torch.float16,
                               device=torch.device('cuda'), _gpu_free_bytes=lambda: free)
        cfg.cache_max_entry_count = 1.0
        return ModelRunner.plan_num_blocks(fake)

    assert plan(fp) == 64
    assert plan(q8) == (128 if mode != 'online' else free // b8)


# ------------------------------------------------------------------ scale files
def _runner_must_fail(ws, match, **kw):
    calls = []

    def init(*a):  # the weights must not be loaded: scales are checked first
        calls.append(a)
        raise AssertionError('weights loaded before the scale check')

    cfg = EngineConfig.from_workspace(ws, block_size=BLOCK, num_blocks=8, device='cpu',
                                      dtype='fp32', quant_policy=4, **kw)
    with pytest.raises(KVScaleError, match=match) as e:
        ModelRunner(cfg, weights_init=init)
    assert not calls
    assert '\n' not in str(e.value)
    return str(e.value)


@pytest.fixture
def scratch_ws(int8_ws, tmp_path):
    def get(**kw):
        dst = str(tmp_path / 'ws')
        shutil.copytree(int8_ws('gqa', **kw), dst)
        return dst, osp.join(dst, 'triton_models', 'weights')
    return get


def test_missing_scale_file(scratch_ws):
    ws, wdir = scratch_ws()
    path = scale_file(wdir, 1, 0)
    os.remove(path)
    msg = _runner_must_fail(ws, 'missing')
    assert path in msg and 'kv_int8_scales=online' in msg
    # per_head files were never written for this workspace
    assert scale_file(wdir, 0, 0, True) in _runner_must_fail(ws, 'missing',
                                                              kv_int8_scales='per_head')


@pytest.mark.parametrize('values,match', [([0.1, 0.2, 0.3], 'bytes'), ([0.0, 0.1], 'k_scale'),
                                          ([0.1, float('nan')], 'v_scale'),
                                          ([0.1, -0.2], 'v_scale'),
                                          ([0.1, float('inf'), 0.1, 0.0], 'k_zp')])
def test_malformed_scale_file(scratch_ws, values, match):
    ws, wdir = scratch_ws()
    path = scale_file(wdir, 0, 0)
    np.array(values, dtype='<f4').tofile(path)
    assert path in _runner_must_fail(ws, match)


def test_malformed_per_head_file(scratch_ws):
    ws, wdir = scratch_ws(per_head=True)
    path = scale_file(wdir, 1, 0, per_head=True)
    np.ones(3, dtype='<f4').tofile(path)  # [2, 2] expected
    assert path in _runner_must_fail(ws, r'\[2, 2\] or \[4, 2\]', kv_int8_scales='per_head')


def test_bad_scale_mode_is_a_config_error(workspace):
    with pytest.raises(ConfigError, match='kv_int8_scales'):
        EngineConfig.from_workspace(workspace('gqa'), kv_int8_scales='per_channel')


def test_chat_cli_one_line_error(scratch_ws):
    """config.ini's quant_policy = 4 without scale files: a one-line error, exit != 0."""
    ws, wdir = scratch_ws()
    for f in glob.glob(osp.join(wdir, '*past_kv_scale*')):
        os.remove(f)
    proc = subprocess.run([sys.executable, '-m', 'lmdeploy.turbomind.chat', ws],
                          input='', capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and 'past_kv_scale.0.weight' in err[0] and 'missing' in err[0], err


# ------------------------------------------------------------------ runtime TP re-slicing
@pytest.mark.parametrize('per_head', [False, True])
def test_scales_reslice_across_tp(int8_ws, per_head):
    mode = 'per_head' if per_head else 'per_tensor'
    ws2 = int8_ws('llama', tp=2, per_head=per_head)  # 4 KV heads, files for 2 ranks
    cfg2 = EngineConfig.from_workspace(ws2, kv_int8_scales=mode)
    files = [load_kv_scales(cfg2, r, 2) for r in range(2)]  # as written
    assert files[0].shape == (2, 4, 2)
    whole = torch.cat(files, dim=2)
    # tp=1 over tp=2 files: every head keeps the value of the file that covers it
    assert torch.equal(load_kv_scales(cfg2, 0, 1), whole)
    # tp=4: each rank one head of a file
    for r in range(4):
        assert torch.equal(load_kv_scales(cfg2, r, 4), whole[:, :, r:r + 1])
    if not per_head:  # a per-tensor file's value on each of its heads
        assert torch.equal(whole[:, :, 0], whole[:, :, 1])
        assert torch.equal(whole[:, :, 2], whole[:, :, 3])


def test_tp2_files_run_at_tp1(int8_ws, workspace, fp32_reference):
    """A tp=2 workspace's scale files, run at tp=1 (runtime re-slicing)."""
    cfg = EngineConfig.from_workspace(int8_ws('llama', tp=2), block_size=BLOCK, num_blocks=40,
                                      device='cpu', dtype='fp32', quant_policy=4)
    runner = ModelRunner(cfg, rank=0, tp=1)
    assert runner.kv_cache.kv_scales.shape == (2, 4, 4)
    agree, rel = _compare(runner, fp32_reference('llama'))
    assert agree >= 0.95 and rel < 0.05, (agree, rel)


# ------------------------------------------------------------------ dummy shapes
@pytest.mark.parametrize('mode', ['per_tensor', 'online'])
def test_dummy_int8(mode):
    from lmdeploy.turbomind.dummy import DUMMY_KV_ABSMAX, dummy_config, dummy_weights
    cfg = dummy_config('tiny', device='cpu', dtype='fp32', block_size=BLOCK, num_blocks=40,
                       quant_policy=4, kv_int8_scales=mode)
    runner = ModelRunner(cfg, weights_init=dummy_weights)
    fp = ModelRunner(dummy_config('tiny', device='cpu', dtype='fp32', block_size=BLOCK,
                                  num_blocks=40), weights_init=dummy_weights)
    if mode == 'per_tensor':
        assert torch.allclose(runner.kv_cache.kv_scales[:, 0], torch.tensor(DUMMY_KV_ABSMAX / 127))
    ids = [i % cfg.vocab_size for i in prompt(16, 7)]
    ref = decode_logits(fp, ids, steps=32)
    got, _ = decode_logits(runner, ids, forced=ref[1], steps=32)
    assert float((got.argmax(-1) == ref[0].argmax(-1)).float().mean()) >= 0.9


@pytest.mark.parametrize('mode', ['per_tensor', 'online'])
def test_profile_generation_int8_max_batch(mode):
    """--quant_policy 4 and a 'max' row (as many sessions as the KV pool holds)."""
    from benchmark.profile_generation import main
    res = main(['--dummy', 'tiny', '--device', 'cpu', '--rows', 'max:20:6', '--test_round', '1',
                '--no_warmup', '--quant_policy', '4', '--kv_int8_scales', mode,
                '--cache_max_entry_count', '3', '--max_batch_size', '8'])
    assert 'quant_policy=4' in res['config'] and f"kv_int8_scales='{mode}'" in res['config']
    # cache_max_entry_count 3 on CPU: 3 sessions of session_len (34 tokens, 1 block each)
    assert res['rows'][0]['concurrency'] == 3 and res['rows'][0]['out_tok_s'] > 0


@pytest.mark.parametrize('symmetry', [True, False])
def test_engine_with_kv_qparams_scales(make_ckpt, workspace, fp32_reference, tmp_path, symmetry):
    """The calibration CLI's files (lmdeploy.lite, in-process) drive the int8 engine."""
    from lmdeploy.lite.apis.kv_qparams import kv_qparams
    ws = tmp_path / 'ws'
    shutil.copytree(workspace('gqa'), ws)
    kv_qparams(str(make_ckpt('gqa')), output_dir=str(ws / 'triton_models' / 'weights'),
               granularity='per_head', symmetry=symmetry, set_quant_policy=True,
               calib_samples=8, max_seq_len=64, device='cpu', progress=False)
    for mode in ('per_tensor', 'per_head'):
        runner = make_runner(str(ws), kv_int8_scales=mode)  # quant_policy 4 from config.ini
        assert runner.kv_cache.pool.dtype == torch.int8
        agree, rel = _compare(runner, fp32_reference('gqa'))
        assert agree >= 0.95 and rel < 0.05, (mode, agree, rel)
