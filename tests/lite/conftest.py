"""Fixtures of the kv_qparams tests: the calibration windows derived independently of
lmdeploy.lite (sentencepiece + random.Random(0), reference section 8.1) and the transformers
K/V statistics of those windows (the oracle the scale files are checked against)."""
import random

import numpy as np
import pytest
import torch

from lmdeploy.lite.utils.calib_dataloader import CORPUS_PATH


@pytest.fixture(scope='session')
def corpus_ids(tokenizer_model):
    """The shipped corpus tokenized by the fixtures' sentencepiece model (no BOS/EOS)."""
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor(model_file=tokenizer_model)
    with open(CORPUS_PATH, encoding='utf-8') as f:
        return sp.encode(f.read())


def windows(ids, nsamples, seqlen, seed=0):
    """v0.0.2's random windows: start = randint(0, len - seqlen) from random.Random(seed)."""
    rng = random.Random(seed)
    return [ids[s:s + seqlen] for s in (rng.randint(0, len(ids) - seqlen) for _ in range(nsamples))]


def hf_kv(model_path, samples):
    """Per layer, K and V of every sample as float32 numpy [samples, kv_heads, tokens, head_dim],
    from transformers' own cache of a CausalLM forward (K after rotary embedding)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    ks, vs = [], []
    with torch.no_grad():
        for ids in samples:
            out = model(torch.tensor([ids]), use_cache=True)
            cache = out['cache'] if 'cache' in out.keys() else out['past_key_values']
            if hasattr(cache, 'layers'):
                pairs = [(layer.keys, layer.values) for layer in cache.layers]
            else:
                pairs = list(cache.to_legacy_cache() if hasattr(cache, 'to_legacy_cache') else cache)
            ks.append([k[0].numpy() for k, _ in pairs])
            vs.append([v[0].numpy() for _, v in pairs])
    layers = len(ks[0])
    return ([np.stack([s[i] for s in ks]) for i in range(layers)],
            [np.stack([s[i] for s in vs]) for i in range(layers)])


def expected_rows(x, symmetric):
    """The contract's qparams of the values `x` (any shape), float32: [scale] or [scale, zp]."""
    x = x.astype(np.float32)
    if symmetric:
        return [max(np.float32(np.abs(x).max()) / np.float32(127), np.float32(1e-5))]
    mn, mx = np.float32(x.min()), np.float32(x.max())
    return [max((mx - mn) / np.float32(255), np.float32(1e-5)), (mx + mn) / np.float32(2)]


def expected_files(k_layers, v_layers, num_tp, symmetric):
    """{file name: float32 array} for the per-tensor and per-head files (contract formulas)."""
    files = {}
    for i, (k, v) in enumerate(zip(k_layers, v_layers)):
        h = k.shape[1] // num_tp
        for t in range(num_tp):
            ks, vs = k[:, t * h:(t + 1) * h], v[:, t * h:(t + 1) * h]
            files[f'layers.{i}.past_kv_scale.{t}.weight'] = np.array(
                expected_rows(ks, symmetric) + expected_rows(vs, symmetric), np.float32)
            per_head = [expected_rows(ks[:, j], symmetric) + expected_rows(vs[:, j], symmetric)
                        for j in range(h)]
            files[f'layers.{i}.past_kv_scale.{t}.per_head.weight'] = np.array(per_head, np.float32).T
    return files
