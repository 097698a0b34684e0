"""The same data plane on a CUDA device (skipped without one): device placement, the GPU memory
plan, fp16 on GPU. Kernels are whatever kernels.select picks (references until Triton lands)."""
import pytest
import torch

from lmdeploy.turbomind.config import EngineConfig
from lmdeploy.turbomind.model_runner import ModelRunner

from .driver import Driver
from .test_llama import full_prompt_logits, hf_greedy, hf_logits, prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.mark.parametrize('variant', ['gqa', 'internlm', 'head128'])
def test_cuda_fp32_matches_transformers(workspace, hf_model, variant):
    cfg = EngineConfig.from_workspace(workspace(variant), device='cuda', dtype='fp32',
                                      block_size=16, num_blocks=64)
    runner = ModelRunner(cfg)
    assert runner.kv_cache.pool.is_cuda and runner.weights.layers[0].w13.is_cuda
    ids = prompt(37, seed=11)
    got = full_prompt_logits(runner, ids).cpu()
    diff = (got - hf_logits(hf_model(variant), ids)).abs().max().item()
    assert diff < 1e-3, diff
    ids = prompt(9, seed=12)
    assert Driver(runner).generate([ids], 16, chunk=3) == [hf_greedy(hf_model(variant), ids)]


def test_cuda_fp16_and_memory_plan(workspace):
    ws = workspace('gqa')
    cfg = EngineConfig.from_workspace(ws, device='cuda', cache_max_entry_count=0.05,
                                      session_len=4096)
    assert cfg.dtype == 'fp16'
    runner = ModelRunner(cfg)
    free, _ = torch.cuda.mem_get_info()
    assert runner.num_blocks >= cfg.blocks_per_session()
    assert runner.kv_cache.nbytes() < 0.06 * (free + runner.kv_cache.nbytes())
    ids = prompt(20, seed=13)
    ref = full_prompt_logits(ModelRunner(EngineConfig.from_workspace(
        ws, device='cpu', num_blocks=16, block_size=16)), ids)
    got = full_prompt_logits(runner, ids).cpu()
    assert got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()) < 0.01
