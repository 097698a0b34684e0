"""The tiny-checkpoint factory (tests/fixtures/checkpoints.py): formats, loadability, seeding."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import TOKENIZER_MODEL, VARIANTS, plain_twin, reference_state_dict

HF_FORMATS = ('safetensors', 'bin')


def read_hf_dir(path):
    """Every tensor of an HF directory, read straight from its files."""
    sd = {}
    for fname in sorted(os.listdir(path)):
        full = os.path.join(path, fname)
        if fname.endswith('.safetensors'):
            sd.update(load_file(full))
        elif fname.endswith('.bin'):
            sd.update(torch.load(full, map_location='cpu', weights_only=True))
    return sd


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('fmt', HF_FORMATS)
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_hf_dir_holds_reference_weights_and_loads(make_ckpt, variant, fmt):
    from transformers import AutoModelForCausalLM
    path = make_ckpt(variant, fmt)
    ref = reference_state_dict(variant)
    files = set(os.listdir(path))
    assert {'config.json', 'generation_config.json', 'tokenizer.model'} <= files
    with open(path / 'tokenizer.model', 'rb') as f, open(TOKENIZER_MODEL, 'rb') as g:
        assert f.read() == g.read()
    index = {'safetensors': 'model.safetensors.index.json',
             'bin': 'pytorch_model.bin.index.json'}[fmt]
    with open(path / index) as f:
        weight_map = json.load(f)['weight_map']
    shard_files = sorted(set(weight_map.values()))
    assert len(shard_files) == 2 and all((path / s).is_file() for s in shard_files)
    stem = 'model' if fmt == 'safetensors' else 'pytorch_model'
    assert shard_files[0] == f'{stem}-00001-of-00002.{fmt}'
    on_disk = read_hf_dir(path)
    assert set(weight_map) == set(on_disk)
    if variant == 'baichuan':
        for i in range(2):
            p = f'model.layers.{i}.self_attn.'
            fused = torch.cat([ref[f'{p}{c}_proj.weight'] for c in 'qkv'], 0)
            assert torch.equal(on_disk.pop(f'{p}W_pack.weight'), fused)
            for c in 'qkv':
                ref.pop(f'{p}{c}_proj.weight')
        assert_same(on_disk, ref)
        path = plain_twin(path)
        ref = reference_state_dict(variant)
        assert_same(read_hf_dir(path), ref)
    else:
        assert_same(on_disk, ref)
    model = AutoModelForCausalLM.from_pretrained(path)
    loaded = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(loaded[k], v), k
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 200]])).logits
    assert logits.shape == (1, 4, 2048) and torch.isfinite(logits).all()


def test_variant_shapes():
    cfgs = {v: reference_state_dict(v) for v in VARIANTS}
    assert cfgs['head128']['model.layers.0.self_attn.q_proj.weight'].shape == (256, 256)
    assert cfgs['gqa']['model.layers.0.self_attn.k_proj.weight'].shape == (32, 64)
    assert cfgs['llama']['model.layers.0.self_attn.k_proj.weight'].shape == (64, 64)
    assert 'model.layers.1.self_attn.o_proj.bias' in cfgs['internlm']
    assert not any(k.endswith('.bias') for k in cfgs['gqa'])
    assert cfgs['gqa']['model.embed_tokens.weight'].shape == (2048, 64)
    # every tensor is distinct (norms are not all ones)
    norm = cfgs['gqa']['model.layers.0.input_layernorm.weight']
    assert not torch.equal(norm, torch.ones_like(norm))


def test_rope_theta_and_dtype(make_ckpt):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(make_ckpt('rope', 'safetensors'))
    assert cfg.rope_parameters['rope_theta'] == 500000.0
    path = make_ckpt('gqa', 'safetensors', dtype=torch.bfloat16)
    sd = read_hf_dir(path)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert_same(sd, reference_state_dict('gqa', torch.bfloat16))


def test_single_file_and_more_shards(make_ckpt):
    one = make_ckpt('gqa', 'safetensors', shards=1)
    assert sorted(f for f in os.listdir(one) if f.endswith('.safetensors')) == ['model.safetensors']
    assert not os.path.exists(one / 'model.safetensors.index.json')
    one_bin = make_ckpt('gqa', 'bin', shards=1)
    assert 'pytorch_model.bin' in os.listdir(one_bin)
    three = make_ckpt('gqa', 'bin', shards=3)
    assert len([f for f in os.listdir(three) if f.endswith('.bin')]) == 3
    for p in (one, one_bin, three):
        assert_same(read_hf_dir(p), reference_state_dict('gqa'))


def test_seed_and_cache(make_ckpt):
    a, b = reference_state_dict('gqa', seed=0), reference_state_dict('gqa', seed=1)
    assert not torch.equal(a['lm_head.weight'], b['lm_head.weight'])
    assert_same(a, reference_state_dict('gqa', seed=0))
    p = make_ckpt('gqa', 'safetensors')
    mtime = os.path.getmtime(p / 'config.json')
    assert make_ckpt('gqa', 'safetensors') == p
    assert os.path.getmtime(p / 'config.json') == mtime
    assert make_ckpt('gqa', 'safetensors', num_hidden_layers=3) != p


def _meta_rows_to_hf(x, n_heads):
    """Independent inverse: Meta row 2j of a head is HF row j, row 2j+1 is HF row d/2 + j."""
    d = x.shape[0] // n_heads
    out = torch.empty_like(x)
    for h in range(n_heads):
        for j in range(d // 2):
            out[h * d + j] = x[h * d + 2 * j]
            out[h * d + d // 2 + j] = x[h * d + 2 * j + 1]
    return out


@pytest.mark.parametrize('variant', ['gqa', 'internlm', 'head128'])
def test_meta_shards_recombine_to_hf(make_ckpt, variant):
    path = make_ckpt(variant, 'meta', rope_freqs=True)
    assert sorted(f for f in os.listdir(path) if f.endswith('.pth')) == [
        'consolidated.00.pth', 'consolidated.01.pth']
    with open(path / 'params.json') as f:
        params = json.load(f)
    ref = reference_state_dict(variant)
    cfg = VARIANTS[variant]
    assert params['n_layers'] == 2 and params['n_heads'] == cfg['num_attention_heads']
    assert params['dim'] == cfg['hidden_size'] and params['norm_eps'] == 1e-6
    assert params.get('n_kv_heads', params['n_heads']) == cfg['num_key_value_heads']
    s0, s1 = (torch.load(path / f'consolidated.0{i}.pth', weights_only=True) for i in range(2))
    assert set(s0) == set(s1) and 'rope.freqs' in s0
    cat0 = lambda k: torch.cat([s0[k], s1[k]], 0)  # noqa: E731
    catl = lambda k: torch.cat([s0[k], s1[k]], -1)  # noqa: E731
    assert torch.equal(catl('tok_embeddings.weight'), ref['model.embed_tokens.weight'])
    assert torch.equal(cat0('output.weight'), ref['lm_head.weight'])
    assert torch.equal(s0['norm.weight'], s1['norm.weight'])
    assert torch.equal(s0['norm.weight'], ref['model.norm.weight'])
    heads, kv = cfg['num_attention_heads'], cfg['num_key_value_heads']
    for i in range(2):
        hf, a = f'model.layers.{i}.', f'layers.{i}.'
        assert torch.equal(_meta_rows_to_hf(cat0(f'{a}attention.wq.weight'), heads),
                           ref[f'{hf}self_attn.q_proj.weight'])
        assert torch.equal(_meta_rows_to_hf(cat0(f'{a}attention.wk.weight'), kv),
                           ref[f'{hf}self_attn.k_proj.weight'])
        assert torch.equal(cat0(f'{a}attention.wv.weight'), ref[f'{hf}self_attn.v_proj.weight'])
        assert torch.equal(catl(f'{a}attention.wo.weight'), ref[f'{hf}self_attn.o_proj.weight'])
        assert torch.equal(cat0(f'{a}feed_forward.w1.weight'), ref[f'{hf}mlp.gate_proj.weight'])
        assert torch.equal(cat0(f'{a}feed_forward.w3.weight'), ref[f'{hf}mlp.up_proj.weight'])
        assert torch.equal(catl(f'{a}feed_forward.w2.weight'), ref[f'{hf}mlp.down_proj.weight'])
        assert torch.equal(s1[f'{a}attention_norm.weight'], ref[f'{hf}input_layernorm.weight'])
        assert torch.equal(s0[f'{a}ffn_norm.weight'], ref[f'{hf}post_attention_layernorm.weight'])
        if variant == 'internlm':
            assert torch.equal(_meta_rows_to_hf(cat0(f'{a}attention.wq.bias'), heads),
                               ref[f'{hf}self_attn.q_proj.bias'])
            assert torch.equal(s1[f'{a}attention.wo.bias'], ref[f'{hf}self_attn.o_proj.bias'])
        # the split really is model-parallel: each shard holds half of the rows / columns
        assert s0[f'{a}attention.wq.weight'].shape[0] == heads * (params['dim'] // heads) // 2
        inter = ref[f'{hf}mlp.down_proj.weight'].shape[1]
        assert s0[f'{a}feed_forward.w2.weight'].shape[1] == inter // 2
    assert np.allclose(s0['rope.freqs'].numpy()[:1], [1.0])
