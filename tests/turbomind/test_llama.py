"""End to end on CPU fp32: deploy every fixture variant, run the data plane, compare with
transformers on the same (fp16-rounded) weights."""
import pytest
import torch

from lmdeploy.turbomind.config import EngineConfig
from lmdeploy.turbomind.model_runner import ModelRunner
from lmdeploy.turbomind.step_input import RowPlan, build_step_input

from .driver import Driver

VARIANTS = ['llama', 'gqa', 'internlm', 'baichuan', 'head128', 'rope']
FORMATS = ['safetensors', 'meta']
CASES = [(v, f) for v in VARIANTS for f in FORMATS]
ATOL = 1e-4
NEW_TOKENS = 16


def prompt(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 2000, (n - 1,), generator=g).tolist()


def make_runner(ws, block_size=8, num_blocks=128, **kw) -> ModelRunner:
    cfg = EngineConfig.from_workspace(ws, block_size=block_size, num_blocks=num_blocks,
                                      device='cpu', dtype=kw.pop('dtype', 'fp32'), **kw)
    return ModelRunner(cfg)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids, n=NEW_TOKENS):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist()


def full_prompt_logits(runner, ids):
    """decode()-style: the whole prompt in one step, logits for every position."""
    blocks = list(range(-(-len(ids) // runner.block_size)))[::-1]  # non-contiguous order
    step = build_step_input([RowPlan(ids, 0, blocks, 'all')], runner.block_size)
    step.validate(runner.block_size, runner.num_blocks)
    return runner.run(step)


@pytest.mark.parametrize('variant,fmt', CASES)
def test_prompt_logits_match_transformers(workspace, hf_model, variant, fmt):
    runner = make_runner(workspace(variant, fmt))
    ids = prompt(13)
    got = full_prompt_logits(runner, ids)
    ref = hf_logits(hf_model(variant), ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (13, 2048)
    diff = (got - ref).abs().max().item()
    assert diff < ATOL, f'max abs diff {diff}'


@pytest.mark.parametrize('variant,fmt', CASES)
def test_greedy_matches_transformers(workspace, hf_model, variant, fmt):
    ids = prompt(7, seed=1)
    ref = hf_greedy(hf_model(variant), ids)
    runner = make_runner(workspace(variant, fmt))
    assert Driver(runner).generate([ids], NEW_TOKENS) == [ref]


@pytest.mark.parametrize('variant,fmt', CASES)
def test_chunked_prefill_and_batching(workspace, hf_model, variant, fmt):
    model = hf_model(variant)
    a, b = prompt(11, seed=2), prompt(5, seed=3)
    ref_a, ref_b = hf_greedy(model, a), hf_greedy(model, b)
    runner = make_runner(workspace(variant, fmt), block_size=4)
    drv = Driver(runner)
    # chunked prefill: 3 tokens per step
    assert drv.generate([a], NEW_TOKENS, chunk=3) == [ref_a]
    # two sequences of different lengths, both prompts in one step, then batched decode
    assert drv.generate([a, b], NEW_TOKENS) == [ref_a, ref_b]
    # b joins while a decodes; b's prompt is chunked, so steps mix decode rows and chunks
    assert drv.generate([a, b], NEW_TOKENS, chunk=3, start_at=[0, 2]) == [ref_a, ref_b]
    assert len(drv.free) == runner.num_blocks  # everything released


@pytest.mark.parametrize('variant,fmt', [('gqa', 'safetensors'), ('internlm', 'meta'),
                                         ('head128', 'safetensors')])
@pytest.mark.parametrize('block_size', [1, 5, 64])
def test_block_size_not_dividing_prompt(workspace, hf_model, variant, fmt, block_size):
    ids = prompt(13, seed=4)  # 13 is prime: no block size above 1 divides it
    model = hf_model(variant)
    runner = make_runner(workspace(variant, fmt), block_size=block_size, num_blocks=64)
    diff = (full_prompt_logits(runner, ids) - hf_logits(model, ids)).abs().max().item()
    assert diff < ATOL
    assert Driver(runner).generate([ids], NEW_TOKENS, chunk=4) == [hf_greedy(model, ids)]


def test_batched_rows_equal_solo_logits(workspace):
    """Logits of a row do not depend on what else is in the step."""
    runner = make_runner(workspace('gqa'), block_size=4)
    a, b, c = prompt(9, 5), prompt(4, 6), prompt(6, 7)
    solo = [full_prompt_logits(runner, x)[-1] for x in (a, b, c)]
    rows = [RowPlan(a, 0, [0, 1, 2], 'last'), RowPlan(b, 0, [10], 'last'),
            RowPlan(c, 0, [7, 3], 'last')]
    both = runner.run(build_step_input(rows, 4))
    for got, want in zip(both, solo):
        assert (got - want).abs().max().item() < ATOL  # GEMM shapes differ: rounding only


def test_chunk_logits_match_full_prompt(workspace, hf_model):
    """A prompt prefilled in chunks (over its own cached prefix) gives the same logits at every
    position as one full prefill (decode()-style 'all' sampling per chunk)."""
    runner = make_runner(workspace('rope'), block_size=4)
    ids = prompt(14, seed=8)
    ref = hf_logits(hf_model('rope'), ids)
    blocks = [5, 2, 9, 0]
    got = []
    for s in range(0, len(ids), 3):
        step = build_step_input([RowPlan(ids[s:s + 3], s, blocks, 'all')], 4)
        got.append(runner.run(step))
    diff = (torch.cat(got) - ref).abs().max().item()
    assert diff < ATOL


@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
def test_half_precision_runs_on_cpu(workspace, dtype):
    ws = workspace('internlm')
    ids = prompt(10, seed=9)
    ref = full_prompt_logits(make_runner(ws), ids)
    runner = make_runner(ws, dtype=dtype)
    want = {'fp16': torch.float16, 'bf16': torch.bfloat16}[dtype]
    assert runner.kv_cache.pool.dtype == want and runner.weights.layers[0].w13.dtype == want
    got = full_prompt_logits(runner, ids)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = (got - ref).norm() / ref.norm()
    assert rel < (0.01 if dtype == 'fp16' else 0.05), f'relative error {rel}'


@pytest.mark.parametrize('variant', ['internlm', 'gqa'])  # qkv bias; grouped KV heads
def test_dense_prompt_path_equals_paged(workspace, variant):
    """The dense path of one fresh long prompt (CUDA's cuDNN SDPA path, here with the
    reference kernels: q, k, v as three GEMMs over w_qkv's column blocks, then
    prompt_attention) gives the paged path's logits and stores the same KV."""
    from lmdeploy.turbomind.models.llama import DENSE_PROMPT_MIN_TOKENS
    ids = prompt(DENSE_PROMPT_MIN_TOKENS + 3, seed=12)
    out = {}
    for dense in (False, True):
        runner = make_runner(workspace(variant), block_size=16,
                             num_blocks=-(-len(ids) // 16) + 1, session_len=len(ids) + 16)
        runner.model.dense_prompts = dense
        calls = []
        attend = runner.model.k.prompt_attention
        runner.model.k.prompt_attention = lambda *a: calls.append(1) or attend(*a)
        logits = full_prompt_logits(runner, ids)
        assert len(calls) == (runner.cfg.num_layer if dense else 0)
        out[dense] = logits, runner.kv_cache.pool.clone()
    assert (out[True][0] - out[False][0]).abs().max().item() < ATOL
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
