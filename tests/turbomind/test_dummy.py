"""Dummy models (random weights of a named shape, no files) on CPU."""
import pytest
import torch

from lmdeploy.turbomind.dummy import (SHAPES, dummy_config, dummy_weights, hf_model,
                                      weight_bytes)
from lmdeploy.turbomind.model_runner import ModelRunner


def greedy(tm, ids, n):
    out = None
    for out in tm.create_instance().stream_infer(1, ids, request_output_len=n, top_k=1,
                                                 sequence_start=True, sequence_end=True,
                                                 ignore_eos=True):
        pass
    return out[0][0].tolist()


def test_named_shapes():
    cfg = dummy_config('llama2-7b', device='cpu')
    assert (cfg.hidden_size, cfg.num_layer, cfg.inter_size, cfg.vocab_size) == (4096, 32, 11008,
                                                                                32000)
    assert abs(weight_bytes(cfg, dtype=torch.float16) / 1e9 - 13.48) < 0.05  # 6.74 B params
    cfg = dummy_config('llama3-8b', device='cpu', session_len=1024)
    assert cfg.kv_head_num == 8 and cfg.rope_theta == 500000 and cfg.session_len == 1024
    assert abs(weight_bytes(cfg, dtype=torch.float16) / 1e9 - 16.06) < 0.05  # 8.03 B params
    with pytest.raises(ValueError, match='unknown dummy shape'):
        dummy_config('llama9-1t')
    assert {'llama2-7b', 'llama3-8b', 'llama2-13b'} <= set(SHAPES)


def test_weights_deterministic_and_scaled():
    cfg = dummy_config('tiny-mha', device='cpu', dtype='fp32')
    a, b = dummy_weights(cfg), dummy_weights(cfg)
    assert torch.equal(a.layers[1].w13, b.layers[1].w13)
    assert not torch.equal(a.layers[0].w13, a.layers[1].w13)
    assert a.nbytes() == weight_bytes(cfg)
    std = a.layers[0].w_qkv.std().item()
    assert abs(std - cfg.hidden_size ** -0.5) < 0.1 * cfg.hidden_size ** -0.5


def test_runner_logits_finite_and_match_transformers():
    from tests.turbomind.driver import Driver
    cfg = dummy_config('tiny-mha', device='cpu', dtype='fp32', num_blocks=32, block_size=16)
    runner = ModelRunner(cfg, weights_init=dummy_weights)
    model = hf_model(cfg, runner.weights)
    ids = torch.randint(3, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    assert torch.isfinite(ref).all() and 0.3 < ref.std().item() < 3
    got = Driver(runner).generate([ids.tolist()], 12)[0]
    with torch.no_grad():
        hf = model.generate(ids[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert got == hf[0, 40:].tolist()


def test_turbomind_dummy_greedy_equals_transformers():
    from lmdeploy.turbomind import TurboMind
    with TurboMind(dummy='tiny', device='cpu', dtype='fp32', max_batch_size=4) as tm:
        assert tm.tokenizer is None and tm.config.extra['dummy'] == 'tiny'
        ids = [1, 5, 9, 33, 200, 17]
        got = greedy(tm, ids, 16)
        model = hf_model(tm.config, tm.engine.runner.weights)
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False)
        assert got == hf[0, len(ids):].tolist()


def test_turbomind_needs_a_path_or_dummy():
    from lmdeploy.turbomind import TurboMind
    with pytest.raises(ValueError, match='workspace'):
        TurboMind()
