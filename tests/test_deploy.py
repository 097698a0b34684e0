"""`python -m lmdeploy.serve.turbomind.deploy` (reference §1.1, §3).

Weight files are checked against an independent numpy computation of the v0.0.2 layout from
the HF tensors (transpose to [in, out], q/k columns permuted per head to interleaved rotary
pairs, per-rank q_r|k_r|v_r fusion, TP splits), config.ini key by key and in order, the tree and
its symlinks; bad input is run through the CLI in a subprocess.
"""
import configparser
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdeploy.serve.turbomind import deploy as D
from tests.fixtures import TOKENIZER_MODEL, VARIANTS, reference_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, 'lmdeploy', 'serve', 'turbomind', 'triton_models')
SCRIPT = os.path.join(ROOT, 'lmdeploy', 'serve', 'turbomind', 'service_docker_up.sh')
TOKENIZER_PY = os.path.join(ROOT, 'lmdeploy', 'turbomind', 'tokenizer.py')
SESSION_LEN = {'llama': 2056, 'llama2': 4104, 'internlm-chat-7b': 2056, 'baichuan-7b': 2056,
               'internlm-chat-7b-8k': 8200}

# --------------------------------------------------------------------------------------------
# Independent expectation (plain numpy, straight from the reference text)


def f16(t):
    return t.float().numpy().astype(np.float16)


def interleave_cols(w, n_heads, d):
    """[in, n_heads*d]: per head, new column 2j <- old j, new column 2j+1 <- old d/2 + j."""
    idx = []
    for h in range(n_heads):
        for j in range(d // 2):
            idx += [h * d + j, h * d + d // 2 + j]
    return w[..., idx]


def expected_files(sd, cfg, tp):
    H, n, nk = cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_key_value_heads']
    d = H // n
    L = cfg.get('num_hidden_layers', 2)
    out = {'tok_embeddings.weight': f16(sd['model.embed_tokens.weight']),
           'norm.weight': f16(sd['model.norm.weight']),
           'output.weight': f16(sd['lm_head.weight'])}
    for i in range(L):
        hf, a, f = f'model.layers.{i}.', f'layers.{i}.attention.', f'layers.{i}.feed_forward.'
        q = interleave_cols(f16(sd[f'{hf}self_attn.q_proj.weight']).T, n, d)
        k = interleave_cols(f16(sd[f'{hf}self_attn.k_proj.weight']).T, nk, d)
        v = f16(sd[f'{hf}self_attn.v_proj.weight']).T
        o = f16(sd[f'{hf}self_attn.o_proj.weight']).T
        qs, ks = n * d // tp, nk * d // tp
        for r in range(tp):
            out[f'{a}w_qkv.{r}.weight'] = np.concatenate([
                q[:, r * qs:(r + 1) * qs], k[:, r * ks:(r + 1) * ks], v[:, r * ks:(r + 1) * ks]
            ], 1)
            out[f'{a}wo.{r}.weight'] = o[r * qs:(r + 1) * qs]
        if f'{hf}self_attn.q_proj.bias' in sd:
            qb = interleave_cols(f16(sd[f'{hf}self_attn.q_proj.bias']), n, d)
            kb = interleave_cols(f16(sd[f'{hf}self_attn.k_proj.bias']), nk, d)
            vb = f16(sd[f'{hf}self_attn.v_proj.bias'])
            for r in range(tp):
                out[f'{a}w_qkv.{r}.bias'] = np.concatenate(
                    [qb[r * qs:(r + 1) * qs], kb[r * ks:(r + 1) * ks], vb[r * ks:(r + 1) * ks]])
                out[f'{a}wo.{r}.bias'] = f16(sd[f'{hf}self_attn.o_proj.bias'])
        w1 = f16(sd[f'{hf}mlp.gate_proj.weight']).T
        w3 = f16(sd[f'{hf}mlp.up_proj.weight']).T
        w2 = f16(sd[f'{hf}mlp.down_proj.weight']).T
        I_r = w1.shape[1] // tp
        for r in range(tp):
            out[f'{f}w1.{r}.weight'] = w1[:, r * I_r:(r + 1) * I_r]
            out[f'{f}w3.{r}.weight'] = w3[:, r * I_r:(r + 1) * I_r]
            out[f'{f}w2.{r}.weight'] = w2[r * I_r:(r + 1) * I_r]
        out[f'layers.{i}.attention_norm.weight'] = f16(sd[f'{hf}input_layernorm.weight'])
        out[f'layers.{i}.ffn_norm.weight'] = f16(sd[f'{hf}post_attention_layernorm.weight'])
    return out


def expected_ini(model_name, cfg, tp, rope_theta=None):
    H, n = cfg['hidden_size'], cfg['num_attention_heads']
    keys = [('model_name', model_name), ('head_num', n),
            ('kv_head_num', cfg['num_key_value_heads']), ('size_per_head', H // n),
            ('vocab_size', cfg.get('vocab_size', 2048)), ('num_layer', 2),
            ('rotary_embedding', H // n)]
    if rope_theta:
        keys.append(('rope_theta', rope_theta))
    keys += [('inter_size', cfg.get('intermediate_size', 128)), ('norm_eps', '1e-06'),
             ('attn_bias', int(cfg.get('attention_bias', False))), ('start_id', 1),
             ('end_id', 2), ('weight_type', 'fp16'), ('max_batch_size', 32),
             ('max_context_token_num', 4), ('session_len', SESSION_LEN[model_name]),
             ('step_length', 1), ('cache_max_entry_count', 48), ('cache_chunk_size', 1),
             ('use_context_fmha', 1), ('quant_policy', 0), ('tensor_para_size', tp)]
    return [(k, str(v)) for k, v in keys]


def variant_cfg(variant):
    cfg = {'intermediate_size': 128, **VARIANTS[variant]}
    return cfg


def read_ini(ws):
    path = os.path.join(ws, 'triton_models', 'weights', 'config.ini')
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    assert lines[0] == '[llama]' and lines[-1] == ''
    return [tuple(line.split(' = ', 1)) for line in lines[1:-1]]


def weight_files(ws):
    wdir = os.path.join(ws, 'triton_models', 'weights')
    return {f: os.path.join(wdir, f) for f in os.listdir(wdir) if f != 'config.ini'}


def check_weights(ws, expected):
    files = weight_files(ws)
    assert set(files) == set(expected)
    for name, arr in expected.items():
        with open(files[name], 'rb') as f:
            data = f.read()
        assert data == np.ascontiguousarray(arr, dtype=np.float16).tobytes(), name


def convert(tmp_path, model_name, path, fmt='hf', tp=1, tag='ws', **kw):
    ws = str(tmp_path / f'{tag}-tp{tp}')
    if fmt == 'llama':
        kw.setdefault('tokenizer_path', str(path / 'tokenizer.model'))
    D.deploy(model_name, str(path), fmt, dst_path=ws, tp=tp, **kw)
    return ws


MODEL_NAME = {'llama': 'llama', 'gqa': 'llama2', 'internlm': 'internlm-chat-7b',
              'baichuan': 'baichuan-7b', 'head128': 'llama', 'rope': 'llama'}

# --------------------------------------------------------------------------------------------
# Every variant x format x tp


@pytest.mark.parametrize('fmt', ['safetensors', 'bin', 'meta'])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_convert_matches_independent_layout(tmp_path, make_ckpt, variant, fmt):
    path = make_ckpt(variant, fmt)
    cfg = variant_cfg(variant)
    sd = reference_state_dict(variant)
    name = MODEL_NAME[variant]
    rope = '500000.0' if variant == 'rope' else None
    results = {}
    for tp in (1, 2):
        ws = convert(tmp_path, name, path, 'llama' if fmt == 'meta' else 'hf', tp)
        check_weights(ws, expected_files(sd, cfg, tp))
        assert read_ini(ws) == expected_ini(name, cfg, tp, rope)
        results[tp] = ws
    # tp=2 files recombine into the tp=1 tensors (no reference to the expectation above)
    one, two = weight_files(results[1]), weight_files(results[2])
    H, n, nk = cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_key_value_heads']
    d = H // n

    def load(files, name, shape):
        return np.fromfile(files[name], dtype=np.float16).reshape(shape)

    for i in range(2):
        a, f = f'layers.{i}.attention.', f'layers.{i}.feed_forward.'
        width = (n + 2 * nk) * d
        full = load(one, f'{a}w_qkv.0.weight', (H, width))
        parts = [load(two, f'{a}w_qkv.{r}.weight', (H, width // 2)) for r in range(2)]
        qs, ks = n * d // 2, nk * d // 2
        q = np.concatenate([p[:, :qs] for p in parts], 1)
        k = np.concatenate([p[:, qs:qs + ks] for p in parts], 1)
        v = np.concatenate([p[:, qs + ks:] for p in parts], 1)
        assert np.array_equal(np.concatenate([q, k, v], 1), full)
        assert np.array_equal(
            np.concatenate([load(two, f'{a}wo.{r}.weight', (n * d // 2, H)) for r in range(2)]),
            load(one, f'{a}wo.0.weight', (n * d, H)))
        inter = cfg['intermediate_size']
        for key, axis in (('w1', 1), ('w3', 1), ('w2', 0)):
            shape1 = (H, inter) if axis else (inter, H)
            shape2 = (H, inter // 2) if axis else (inter // 2, H)
            cat = np.concatenate([load(two, f'{f}{key}.{r}.weight', shape2) for r in range(2)],
                                 axis)
            assert np.array_equal(cat, load(one, f'{f}{key}.0.weight', shape1))
        if variant == 'internlm':
            assert one[f'{a}wo.0.bias'] and all(
                open(two[f'{a}wo.{r}.bias'], 'rb').read() == open(one[f'{a}wo.0.bias'], 'rb').read()
                for r in range(2))


@pytest.mark.parametrize('variant', ['gqa', 'internlm', 'head128', 'rope'])
def test_meta_equals_hf(tmp_path, make_ckpt, variant):
    for tp in (1, 2):
        hf = convert(tmp_path, 'llama', make_ckpt(variant, 'safetensors'), 'hf', tp, 'hf')
        meta = convert(tmp_path, 'llama', make_ckpt(variant, 'meta', rope_freqs=True), 'llama',
                       tp, 'meta')
        a, b = weight_files(hf), weight_files(meta)
        assert set(b) == set(a) | {'rope.freqs'}  # v0.0.2 exported Meta's rope.freqs as well
        for name in a:
            assert open(a[name], 'rb').read() == open(b[name], 'rb').read(), name
        assert read_ini(hf) == read_ini(meta)


def test_bf16_and_fp16_sources_become_fp16(tmp_path, make_ckpt):
    for dtype in (torch.bfloat16, torch.float16):
        sd = reference_state_dict('gqa', dtype)
        for fmt in ('safetensors', 'bin'):
            ws = convert(tmp_path, 'llama2', make_ckpt('gqa', fmt, dtype=dtype), tp=2,
                         tag=f'{fmt}{dtype}')
            check_weights(ws, expected_files(sd, variant_cfg('gqa'), 2))
    # bf16 really differs from the fp32 weights it was made from (the test is not vacuous)
    ws = convert(tmp_path, 'llama2', make_ckpt('gqa', 'meta', dtype=torch.bfloat16), 'llama', 2)
    check_weights(ws, expected_files(reference_state_dict('gqa', torch.bfloat16),
                                     variant_cfg('gqa'), 2))


@pytest.mark.parametrize('fmt,shards', [('safetensors', 1), ('bin', 1), ('bin', 3),
                                        ('safetensors', 3)])
def test_single_file_and_many_shards(tmp_path, make_ckpt, fmt, shards):
    ws = convert(tmp_path, 'llama2', make_ckpt('gqa', fmt, shards=shards), tp=2)
    check_weights(ws, expected_files(reference_state_dict('gqa'), variant_cfg('gqa'), 2))


def test_head128_bin_is_v002_convertible(tmp_path, make_ckpt):
    """The checkpoint v0.0.2 could convert: files byte-identical to its algorithm; config.ini
    carries every v0.0.2 key with v0.0.2's value except vocab_size (embedding rows, 2048,
    where v0.0.2 wrote the sentencepiece size 2000)."""
    path = make_ckpt('head128', 'bin')
    ws = convert(tmp_path, 'internlm-chat-7b', path, tp=2)
    check_weights(ws, expected_files(reference_state_dict('head128'), variant_cfg('head128'), 2))
    v002 = dict(model_name='internlm-chat-7b', head_num='2', kv_head_num='2',
                size_per_head='128', vocab_size='2000', num_layer='2', rotary_embedding='128',
                inter_size='256', norm_eps='1e-06', attn_bias='0', start_id='1', end_id='2',
                weight_type='fp16', max_batch_size='32', max_context_token_num='4',
                session_len='2056', step_length='1', cache_max_entry_count='48',
                cache_chunk_size='1', use_context_fmha='1', quant_policy='0',
                tensor_para_size='2')
    ini = read_ini(ws)
    assert [k for k, _ in ini] == list(v002)
    assert {k: v for k, v in ini if k != 'vocab_size'} == {
        k: v for k, v in v002.items() if k != 'vocab_size'}
    assert dict(ini)['vocab_size'] == '2048'
    # configparser (what the engine and v0.0.2's TurboMind wrapper use) reads it back
    cp = configparser.ConfigParser()
    cp.read(os.path.join(ws, 'triton_models', 'weights', 'config.ini'))
    assert cp['llama'].getint('session_len') == 2056


def test_tied_lm_head_and_partial_biases(tmp_path, make_ckpt):
    """Beyond v0.0.2: a tied LM head comes from the embedding; q/k/v biases without an o bias
    (Qwen2 style) get a zero wo bias so attn_bias=1 always has every file."""
    import json
    d = _copy(make_ckpt('internlm', 'safetensors', shards=1), tmp_path / 'src')
    sd = load_file(d / 'model.safetensors')
    del sd['lm_head.weight']
    for i in range(2):
        del sd[f'model.layers.{i}.self_attn.o_proj.bias']
    save_file(sd, d / 'model.safetensors')
    with pytest.raises(D.DeployError, match='lm_head.weight'):
        D.deploy('llama', str(d), dst_path=str(tmp_path / 'ws'))
    cfg = json.loads((d / 'config.json').read_text())
    cfg['tie_word_embeddings'] = True
    (d / 'config.json').write_text(json.dumps(cfg))
    D.deploy('llama', str(d), dst_path=str(tmp_path / 'ws'), tp=2)
    ref = reference_state_dict('internlm')
    ref['lm_head.weight'] = ref['model.embed_tokens.weight']
    for i in range(2):
        ref[f'model.layers.{i}.self_attn.o_proj.bias'] = torch.zeros(64)
    check_weights(tmp_path / 'ws', expected_files(ref, variant_cfg('internlm'), 2))
    assert dict(read_ini(tmp_path / 'ws'))['attn_bias'] == '1'


# --------------------------------------------------------------------------------------------
# Workspace tree


def test_workspace_tree(tmp_path, make_ckpt):
    path = make_ckpt('gqa', 'safetensors')
    ws = convert(tmp_path, 'llama2', path, tp=2)
    links = {os.path.relpath(os.path.join(dp, x), ws): os.readlink(os.path.join(dp, x))
             for dp, dns, fns in os.walk(ws) for x in dns + fns
             if os.path.islink(os.path.join(dp, x))}
    assert links == {
        'model_repository/turbomind': '../triton_models/interactive',
        'model_repository/preprocessing': '../triton_models/preprocessing',
        'model_repository/postprocessing': '../triton_models/postprocessing',
        'triton_models/interactive/1/weights': '../../weights',
        'triton_models/preprocessing/1/tokenizer': '../../tokenizer',
        'triton_models/postprocessing/1/tokenizer': '../../tokenizer',
    }
    for link in links:
        assert os.path.isdir(os.path.join(ws, link))
    assert os.path.isfile(os.path.join(ws, 'model_repository/turbomind/1/weights/config.ini'))
    assert os.path.isfile(os.path.join(ws, 'triton_models/interactive/1/placeholder'))
    for sub in ('preprocessing', 'postprocessing'):
        assert os.path.isfile(os.path.join(ws, 'triton_models', sub, '1', 'model.py'))
        assert os.path.isfile(os.path.join(ws, 'triton_models', sub, '1', 'tokenizer',
                                           'tokenizer.model'))
    tok = sorted(os.listdir(os.path.join(ws, 'triton_models', 'tokenizer')))
    jsons = sorted(f for f in os.listdir(path) if f.endswith(('.json', '.py')))
    assert tok == sorted(set(['placeholder', 'tokenizer.model', 'tokenizer.py'] + jsons))
    assert 'model.safetensors.index.json' in tok and 'config.json' in tok
    tok_dir = os.path.join(ws, 'triton_models', 'tokenizer')
    assert open(os.path.join(tok_dir, 'tokenizer.model'), 'rb').read() == \
        open(TOKENIZER_MODEL, 'rb').read()
    assert open(os.path.join(tok_dir, 'tokenizer.py')).read() == open(TOKENIZER_PY).read()
    # config.pbtxt: the template plus v0.0.2's two parameters blocks
    template = open(os.path.join(TEMPLATES, 'interactive', 'config.pbtxt')).read()
    pbtxt = open(os.path.join(ws, 'triton_models', 'interactive', 'config.pbtxt')).read()
    assert pbtxt == template + (
        'parameters {\n  key: "tensor_para_size"\n  value: {\n    string_value: "2"\n  }\n}\n'
        'parameters {\n  key: "model_name"\n  value: {\n    string_value: "llama2"\n  }\n}\n')
    for sub in ('preprocessing', 'postprocessing'):
        assert open(os.path.join(ws, 'triton_models', sub, 'config.pbtxt')).read() == \
            open(os.path.join(TEMPLATES, sub, 'config.pbtxt')).read()
    # service_docker_up.sh: copied, executable, TP=1 -> TP=2 and nothing else
    script = open(os.path.join(ws, 'service_docker_up.sh')).read()
    orig = open(SCRIPT).read()
    assert 'TP=1' in orig and 'TP=1' not in script.replace('TP=1', '')
    assert script == orig.replace('TP=1\n', 'TP=2\n')
    assert os.access(os.path.join(ws, 'service_docker_up.sh'), os.X_OK)
    # nothing else at the top level, no temp dirs left beside it
    assert sorted(os.listdir(ws)) == ['model_repository', 'service_docker_up.sh',
                                      'service_up.sh', 'triton_models']
    assert sorted(os.listdir(tmp_path)) == ['ws-tp2']


def test_meta_tokenizer_dir_has_no_json(tmp_path, make_ckpt):
    ws = convert(tmp_path, 'llama', make_ckpt('gqa', 'meta'), 'llama', 1)
    assert sorted(os.listdir(os.path.join(ws, 'triton_models', 'tokenizer'))) == [
        'placeholder', 'tokenizer.model', 'tokenizer.py']


def test_existing_workspace_is_replaced_on_success(tmp_path, make_ckpt):
    ws = tmp_path / 'ws-tp1'
    ws.mkdir()
    (ws / 'stale').write_text('old')
    convert(tmp_path, 'llama2', make_ckpt('gqa', 'safetensors'))
    assert not (ws / 'stale').exists() and (ws / 'triton_models').is_dir()
    assert sorted(os.listdir(tmp_path)) == ['ws-tp1']


# --------------------------------------------------------------------------------------------
# CLI


def cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    cmd = [sys.executable, '-m', 'lmdeploy.serve.turbomind.deploy', *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_cli_success_and_help(tmp_path, make_ckpt):
    path = make_ckpt('internlm', 'bin')
    # v0.0.2's positional form; default dst_path ./workspace
    r = cli('internlm-chat-7b', path, 'hf', '--tp', '2', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ''
    assert 'workspace' in r.stdout and 'internlm-chat-7b' in r.stdout and 'tp=2' in r.stdout
    assert len(r.stdout.strip().splitlines()) == 1
    ws = tmp_path / 'workspace'
    check_weights(ws, expected_files(reference_state_dict('internlm'), variant_cfg('internlm'), 2))
    r = cli('--help')
    assert r.returncode == 0
    text = (r.stdout + r.stderr).lower()
    for flag in ('model_name', 'model_path', 'model_format', 'tokenizer_path', 'dst_path', '--tp',
                 'verbose', 'sentencepiece', 'tensor-parallel'):
        assert flag in text, flag
    r = cli('llama2', make_ckpt('gqa', 'safetensors'), '--dst_path', tmp_path / 'v', '--verbose')
    assert r.returncode == 0 and 'layers.0.attention.w_qkv.0.weight (64, 128)' in r.stdout


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _bad_dirs(tmp_path, make_ckpt):
    """name -> (cli args builder) for every bad input."""
    gqa = make_ckpt('gqa', 'safetensors')
    one = make_ckpt('gqa', 'safetensors', shards=1)
    cases = {}
    cases['unknown model name'] = (['nosuchmodel', gqa], ['nosuchmodel', 'llama2', 'vicuna'])
    cases['unknown format'] = (['llama2', gqa, 'gguf'], ['gguf', 'format'])
    cases['missing path'] = (['llama2', tmp_path / 'nope'], ['nope', 'does not exist'])
    d = _copy(gqa, tmp_path / 'noconfig')
    os.remove(d / 'config.json')
    cases['missing config.json'] = (['llama2', d], ['config.json'])
    d = _copy(gqa, tmp_path / 'badconfig')
    (d / 'config.json').write_text('{"num_hidden_layers": 2}')
    cases['config.json missing key'] = (['llama2', d], ['rms_norm_eps'])
    d = _copy(gqa, tmp_path / 'notok')
    os.remove(d / 'tokenizer.model')
    cases['missing tokenizer'] = (['llama2', d], ['tokenizer', 'does not exist'])
    meta = make_ckpt('gqa', 'meta')
    cases['meta without tokenizer_path'] = (['llama', meta, 'llama'], ['tokenizer_path'])
    d = _copy(meta, tmp_path / 'noparams')
    os.remove(d / 'params.json')
    cases['missing params.json'] = (['llama', d, 'llama', '--tokenizer_path',
                                     d / 'tokenizer.model'], ['params.json'])
    d = _copy(one, tmp_path / 'missing')
    sd = load_file(d / 'model.safetensors')
    del sd['model.layers.1.mlp.up_proj.weight']
    save_file(sd, d / 'model.safetensors')
    cases['tensor missing'] = (['llama2', d], ['missing', 'model.layers.1.mlp.up_proj.weight'])
    d = _copy(one, tmp_path / 'shape')
    sd = load_file(d / 'model.safetensors')
    k = 'model.layers.0.self_attn.k_proj.weight'
    sd[k] = sd[k].t().contiguous()
    save_file(sd, d / 'model.safetensors')
    cases['wrong shape'] = (['llama2', d], ['k_proj', '(64, 32)', '(32, 64)'])
    d = _copy(gqa, tmp_path / 'layers')
    text = (d / 'config.json').read_text().replace('"num_hidden_layers": 2',
                                                   '"num_hidden_layers": 3')
    (d / 'config.json').write_text(text)
    cases['layer count mismatch'] = (['llama2', d], ['layer count', '3', '2'])
    d = _copy(meta, tmp_path / 'metalayers')
    (d / 'params.json').write_text((d / 'params.json').read_text().replace('"n_layers": 2',
                                                                           '"n_layers": 1'))
    cases['meta layer count mismatch'] = (['llama', d, 'llama', '--tokenizer_path',
                                           d / 'tokenizer.model'], ['layer count'])
    cases['tp vs heads'] = (['llama2', gqa, '--tp', '3'], ['tp=3', 'heads'])
    cases['tp vs kv heads'] = (['llama2', gqa, '--tp', '4'], ['tp=4', 'kv heads'])
    cases['tp vs inter'] = (['llama', make_ckpt('llama', 'safetensors', intermediate_size=130),
                             '--tp', '4'], ['tp=4', 'inter_size'])
    cases['tp vs vocab'] = (['llama', make_ckpt('llama', 'safetensors', vocab_size=2002),
                             '--tp', '4'], ['tp=4', 'vocab'])
    cases['tp not a number'] = (['llama2', gqa, '--tp', '0'], ['tp'])
    cases['embedding smaller than tokenizer'] = (
        ['llama', make_ckpt('llama', 'safetensors', vocab_size=1024)], ['2000', '1024'])
    d = _copy(gqa, tmp_path / 'truncated')
    shard = d / 'model-00002-of-00002.safetensors'
    shard.write_bytes(shard.read_bytes()[:1000])
    cases['truncated safetensors shard'] = (['llama2', d], ['model-00002-of-00002.safetensors'])
    d = _copy(make_ckpt('gqa', 'bin'), tmp_path / 'garbage')
    (d / 'pytorch_model-00001-of-00002.bin').write_bytes(b'not a checkpoint at all' * 10)
    cases['corrupt bin shard'] = (['llama2', d], ['pytorch_model-00001-of-00002.bin'])
    d = _copy(gqa, tmp_path / 'lostshard')
    os.remove(d / 'model-00001-of-00002.safetensors')
    cases['shard listed in index is missing'] = (['llama2', d], ['model-00001-of-00002'])
    d = _copy(meta, tmp_path / 'badmeta')
    (d / 'consolidated.01.pth').write_bytes(b'\x00' * 100)
    cases['corrupt meta shard'] = (['llama', d, 'llama', '--tokenizer_path',
                                    d / 'tokenizer.model'], ['consolidated.01.pth'])
    return cases


def test_bad_input_fails_cleanly(tmp_path, make_ckpt):
    """Every bad input: exit code != 0, one `error: ...` line naming the problem on stderr, no
    partial workspace (fresh dst) and an existing workspace left untouched."""
    from concurrent.futures import ThreadPoolExecutor
    (tmp_path / 'src').mkdir()
    cases = sorted(_bad_dirs(tmp_path / 'src', make_ckpt).items())

    def run(i, case, args, words):
        out = tmp_path / f'out{i}'
        existing = out / 'existing'
        existing.mkdir(parents=True)
        (existing / 'keep').write_text('precious')
        dst = existing if i % 2 else out / 'fresh'  # half fresh, half an existing workspace
        r = cli(*args, '--dst_path', dst)
        lines = r.stderr.strip().splitlines()
        problems = []
        if r.returncode == 0:
            problems.append('exit code 0')
        if len(lines) != 1 or not lines[0].startswith('error: ') or 'Traceback' in r.stderr:
            problems.append(f'stderr {r.stderr!r}')
        elif not all(w.lower() in lines[0].lower() for w in map(str, words)):
            problems.append(f'message {lines[0]!r} lacks one of {words}')
        if sorted(os.listdir(out)) != ['existing']:
            problems.append(f'left behind {sorted(os.listdir(out))}')
        if (sorted(os.listdir(existing)) != ['keep']
                or (existing / 'keep').read_text() != 'precious'):
            problems.append('existing workspace touched')
        return f'{case}: {"; ".join(problems)}' if problems else None

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: run(c[0], *c[1][:1], *c[1][1]), enumerate(cases)))
    failures = [r for r in results if r]
    assert len(cases) >= 20 and not failures, '\n'.join(failures)


def test_dst_inside_source_is_refused(tmp_path, make_ckpt):
    d = _copy(make_ckpt('gqa', 'safetensors'), tmp_path / 'model')
    before = sorted(os.listdir(d))
    with pytest.raises(D.DeployError, match='would replace'):
        D.deploy('llama2', str(d), dst_path=str(d))
    with pytest.raises(D.DeployError, match='would replace'):
        D.deploy('llama2', str(d), dst_path=str(tmp_path))
    assert sorted(os.listdir(d)) == before


def test_failure_while_writing_leaves_nothing(tmp_path, make_ckpt, monkeypatch):
    good = make_ckpt('gqa', 'safetensors')
    ws = tmp_path / 'a' / 'b' / 'ws'
    D.deploy('llama2', str(good), dst_path=str(ws))  # missing parents are created
    assert (ws / 'triton_models' / 'weights' / 'config.ini').is_file()
    before = open(ws / 'triton_models' / 'weights' / 'norm.weight', 'rb').read()
    calls = []

    def failing_save(self, name, x):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, 'No space left on device')
        return real_save(self, name, x)

    real_save = D.Writer.save
    monkeypatch.setattr(D.Writer, 'save', failing_save)
    for dst in (ws, tmp_path / 'x' / 'y' / 'ws'):
        calls.clear()
        with pytest.raises(D.DeployError, match='No space left'):
            D.deploy('llama2', str(good), dst_path=str(dst), tp=2)
    assert not (tmp_path / 'x').exists()  # parents this run created are removed again
    assert sorted(os.listdir(ws.parent)) == ['ws']
    assert open(ws / 'triton_models' / 'weights' / 'norm.weight', 'rb').read() == before
