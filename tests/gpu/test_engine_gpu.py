"""The whole engine on a CUDA GPU (Triton kernels) against the CPU reference path.

Skips without CUDA. On the lent H100:  python3 -m pytest -q tests/gpu/test_engine_gpu.py
"""
import pytest
import torch

from tests.turbomind.conftest import workspace  # noqa: F401  (fixture)
from tools.minichat_data import answer_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

VARIANTS = ['llama', 'gqa', 'internlm', 'baichuan', 'head128', 'rope']
PROMPTS = [[1, 17, 99, 256, 1024, 7], [1, 5] * 20, list(range(3, 70))]


def greedy(tm, prompt, n=24):
    outputs = None
    for outputs in tm.create_instance().stream_infer(1, prompt, request_output_len=n, top_k=1,
                                                     sequence_start=True, sequence_end=True,
                                                     ignore_eos=True):
        pass
    return outputs[0][0].tolist()


@pytest.mark.parametrize('variant', VARIANTS)
def test_fp32_gpu_greedy_equals_cpu(workspace, variant):
    from lmdeploy.turbomind import TurboMind
    ws = workspace(variant)
    with TurboMind(ws, device='cpu', dtype='fp32') as cpu, \
            TurboMind(ws, device='cuda', dtype='fp32', block_size=16) as gpu:
        assert gpu.engine.runner.kernels.impl['paged_attention'] == 'triton'
        for prompt in PROMPTS:
            assert greedy(gpu, prompt) == greedy(cpu, prompt)


@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
def test_minichat_answers_on_gpu(tmp_path, dtype):
    from lmdeploy.serve.turbomind.deploy import deploy
    from lmdeploy.turbomind import TurboMind
    ws = str(tmp_path / 'ws')
    deploy('minichat', 'assets/minichat', dst_path=ws)
    questions = ['What is 37 + 58?', 'Reverse the word guitar.', '3 加 4 等于几？', 'Count from 3 to 9.']
    with TurboMind(ws, device='cuda', dtype=dtype) as tm:
        stop = set(tm.stop_words) | {tm.eos_id}
        for q in questions:
            ids = tm.tokenizer.encode(tm.template.get_prompt(q))
            out = greedy(tm, ids, n=48)
            out = out[:next((i for i, t in enumerate(out) if t in stop), len(out))]
            assert tm.tokenizer.decode(out) == answer_for(q)


@pytest.mark.parametrize('variant', ['gqa', 'head128'])
def test_fresh_prompts_through_dense_attention_equal_paged_attention(workspace, variant):
    """A step of one fresh prompt over MAX_MIXED_TOKENS (1024) tokens takes the dense path
    (rotary, store_kv, the dense causal kernel over the new tokens) on CUDA; greedy tokens
    equal the paged-attention path's and the CPU's, and the KV it stored serves the decode
    steps after it."""
    from lmdeploy.turbomind import TurboMind
    ws = workspace(variant)
    with TurboMind(ws, device='cpu', dtype='fp32') as cpu, \
            TurboMind(ws, device='cuda', dtype='fp32', block_size=16, cuda_graph=False) as gpu:
        model = gpu.engine.runner.model
        assert model.dense_prompts
        calls = []
        dense = model.k.prompt_attention
        model.k.prompt_attention = lambda *a: calls.append(1) or dense(*a)
        g = torch.Generator().manual_seed(11)
        prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (1025, 1300)]
        try:
            got = [greedy(gpu, p) for p in prompts]
            assert len(calls) == len(prompts) * gpu.config.num_layer
            gpu.engine.call(lambda: setattr(model, 'dense_prompts', False))
            paged = [greedy(gpu, p) for p in prompts]
        finally:
            model.k.prompt_attention = dense
        assert got == paged == [greedy(cpu, p) for p in prompts]


def test_dense_prompts_compile_no_kernel_after_start_up(workspace):
    """The memory plan runs the longest and the shortest lone prompt, so that prompts on either
    side of the dense attention's switch to cuDNN (3072 tokens) compile nothing in a request."""
    from lmdeploy.turbomind import TurboMind
    from lmdeploy.turbomind.kernels import compiled_variants
    with TurboMind(workspace('gqa'), device='cuda', dtype='fp16', session_len=4096,
                   max_prefill_tokens=4096) as tm:
        assert tm.engine.runner.model.dense_prompts
        before = compiled_variants()
        g = torch.Generator().manual_seed(5)
        for n in (1100, 3500):
            greedy(tm, torch.randint(3, 1000, (n,), generator=g).tolist(), n=2)
        assert compiled_variants() == before
