"""Fixtures of the engine data-plane tests: deployed workspaces and transformers references,
built once per session."""
import os.path as osp

import pytest
import torch

from tests.fixtures import plain_twin


@pytest.fixture(scope='session')
def workspace(make_ckpt, tmp_path_factory):
    """`workspace(variant, fmt='safetensors', tp=1) -> str`: a deployed workspace (cached)."""
    from lmdeploy.serve.turbomind.deploy import deploy
    root = tmp_path_factory.mktemp('workspaces')
    cache = {}

    def get(variant: str, fmt: str = 'safetensors', tp: int = 1) -> str:
        key = (variant, fmt, tp)
        if key not in cache:
            ckpt = make_ckpt(variant, fmt)
            dst = osp.join(str(root), f'{variant}-{fmt}-tp{tp}')
            if fmt == 'meta':
                deploy('llama', str(ckpt), 'llama', tokenizer_path=str(ckpt / 'tokenizer.model'),
                       dst_path=dst, tp=tp)
            else:
                deploy('llama', str(ckpt), 'hf', dst_path=dst, tp=tp)
            cache[key] = dst
        return cache[key]

    return get


@pytest.fixture(scope='session')
def hf_model(make_ckpt):
    """`hf_model(variant) -> LlamaForCausalLM` (fp32, eval) whose weights are rounded to fp16
    like the workspace's: the exactness oracle. Baichuan uses its plain-Llama twin."""
    from transformers import AutoModelForCausalLM
    cache = {}

    def get(variant: str):
        if variant not in cache:
            path = make_ckpt(variant, 'safetensors')
            if variant == 'baichuan':
                path = plain_twin(path)
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            model.eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.half().float())
            model.generation_config.pad_token_id = 0
            cache[variant] = model
        return cache[variant]

    return get
