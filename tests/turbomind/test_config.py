"""EngineConfig: reading config.ini, defaults, overrides and validation."""
import configparser

import pytest

from lmdeploy.turbomind.config import ConfigError, EngineConfig

MODEL = dict(head_num=4, kv_head_num=2, size_per_head=16, vocab_size=2048, num_layer=2,
             rotary_embedding=16, inter_size=128, norm_eps=1e-6, start_id=1, end_id=2)


def write_ini(path, sections):
    cp = configparser.ConfigParser()
    for name, values in sections.items():
        cp[name] = {k: str(v) for k, v in values.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f:
        cp.write(f)


def test_reads_deployed_workspace(workspace):
    ws = workspace('rope')
    cfg = EngineConfig.from_workspace(ws, device='cpu')
    assert (cfg.head_num, cfg.kv_head_num, cfg.size_per_head) == (4, 4, 16)
    assert cfg.rope_theta == 500000.0 and cfg.rotary_embedding == 16
    assert cfg.session_len == 2056 and cfg.max_context_token_num == 4
    assert cfg.max_prefill_tokens == 4 * 2056  # v0.0.2: <= max_batch_size means x session_len
    assert cfg.dtype == 'fp32' and cfg.block_size == 64 and cfg.attn_bias is False
    assert cfg.weight_dir.endswith('triton_models/weights')
    assert EngineConfig.from_workspace(ws + '/triton_models/weights/config.ini').vocab_size == 2048
    assert EngineConfig.from_workspace(workspace('gqa')).rope_theta == 10000.0
    assert EngineConfig.from_workspace(workspace('internlm')).attn_bias is True


def test_turbomind_section_first_and_defaults(tmp_path):
    ini = tmp_path / 'triton_models' / 'weights' / 'config.ini'
    write_ini(ini, {'llama': {**MODEL, 'max_batch_size': 99},
                    'turbomind': {**MODEL, 'kv_head_num': 4, 'legacy_key': 3}})
    cfg = EngineConfig.from_workspace(tmp_path)
    assert cfg.kv_head_num == 4 and cfg.max_batch_size == 32  # [turbomind] wins, defaults
    assert cfg.extra == {'legacy_key': '3'}
    assert cfg.session_len == 2160 and cfg.max_context_token_num == 5  # isqrt(32)
    assert cfg.max_prefill_tokens == 5 * 2160


def test_overrides_and_derivations(tmp_path):
    write_ini(tmp_path / 'config.ini', {'llama': {**MODEL, 'max_context_token_num': 40}})
    cfg = EngineConfig.from_workspace(tmp_path, max_batch_size='8', dtype='bf16',
                                      block_size=16, device='cpu')
    assert cfg.max_batch_size == 8 and cfg.dtype == 'bf16' and cfg.block_size == 16
    assert cfg.max_prefill_tokens == 40  # > max_batch_size: a token count already
    assert EngineConfig.from_workspace(tmp_path, max_prefill_tokens=100).max_prefill_tokens == 100
    write_ini(tmp_path / 'config.ini', {'llama': {**MODEL, 'kv_head_num': 0}})
    assert EngineConfig.from_workspace(tmp_path).kv_head_num == 4  # absent/0 -> head_num


def test_caller_defaults_yield_to_the_file_and_to_overrides(tmp_path):
    defaults = {'max_mixed_prefill_tokens': 512}
    write_ini(tmp_path / 'config.ini', {'llama': MODEL})
    assert EngineConfig.from_workspace(tmp_path).max_mixed_prefill_tokens == 0  # engine default
    assert EngineConfig.from_workspace(tmp_path, defaults).max_mixed_prefill_tokens == 512
    cfg = EngineConfig.from_workspace(tmp_path, defaults, max_mixed_prefill_tokens=64)
    assert cfg.max_mixed_prefill_tokens == 64
    write_ini(tmp_path / 'config.ini', {'llama': {**MODEL, 'max_mixed_prefill_tokens': 0}})
    assert EngineConfig.from_workspace(tmp_path, defaults).max_mixed_prefill_tokens == 0


@pytest.mark.parametrize('overrides,match', [
    (dict(max_batchsize=3), 'unknown engine config key'),
    (dict(block_size=0), 'block_size must be positive'),
    (dict(max_batch_size=-1), 'max_batch_size must be positive'),
    (dict(kv_head_num=3), 'not divisible by kv_head_num'),
    (dict(dtype='fp8'), 'dtype must be one of'),
    (dict(block_size='big'), 'expected int'),
    (dict(block_size=2.5), 'expected int'),
    (dict(tensor_para_size=3), 'tensor_para_size 3 does not divide'),
    (dict(rotary_embedding=18), 'rotary_embedding'),
    (dict(weight_type='int4'), 'weight_type'),
    (dict(device='tpu'), 'device'),
    (dict(end_id=5000), 'end_id'),
    (dict(norm_eps=0), 'norm_eps'),
    (dict(max_mixed_prefill_tokens=-1), 'max_mixed_prefill_tokens must be >= 0'),
])
def test_bad_values_fail_clearly(tmp_path, overrides, match):
    write_ini(tmp_path / 'config.ini', {'llama': MODEL})
    with pytest.raises(ConfigError, match=match):
        EngineConfig.from_workspace(tmp_path, **overrides)


def test_missing_file_section_and_keys(tmp_path):
    with pytest.raises(ConfigError, match='no config.ini'):
        EngineConfig.from_workspace(tmp_path)
    write_ini(tmp_path / 'config.ini', {'other': MODEL})
    with pytest.raises(ConfigError, match=r'no \[llama\]'):
        EngineConfig.from_workspace(tmp_path)
    write_ini(tmp_path / 'config.ini', {'llama': {k: v for k, v in MODEL.items()
                                                  if k != 'inter_size'}})
    with pytest.raises(ConfigError, match='lacks required key.*inter_size'):
        EngineConfig.from_workspace(tmp_path)
    write_ini(tmp_path / 'config.ini', {'llama': {**MODEL, 'head_num': 'four'}})
    with pytest.raises(ConfigError, match='head_num: expected int'):
        EngineConfig.from_workspace(tmp_path)
