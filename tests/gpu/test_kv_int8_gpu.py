"""int8 KV cache on the GPU: the Triton kernels against their references at realistic shapes,
and CUDA graphs on == off with int8 KV (fixture workspaces with calibrated scale files, online
scales, and a dummy Llama-2-7B shape). Skips without CUDA. On the H100:
    python3 -m pytest -q tests/gpu/test_kv_int8_gpu.py
"""
import pytest
import torch

from tests.gpu.test_cuda_graph_gpu import generate
from tests.gpu.test_kernels_gpu import TOL, gen, make_attention, rel_err
from tests.turbomind.conftest import hf_model, workspace  # noqa: F401  (fixtures)
from tests.turbomind.test_kv_int8 import int8_ws  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

DEV = 'cuda'
MODES = ['static', 'online']


def qparams(mode, hkv, nb, page, seed):
    if mode == 'static':
        g = gen(seed)
        s = 0.02 + 0.03 * torch.rand(2, hkv, device=DEV, generator=g)
        z = 0.3 * torch.randn(2, hkv, device=DEV, generator=g)
        return torch.stack([s[0], z[0], s[1], z[1]])
    return torch.zeros(2, nb, hkv, page, device=DEV)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('page,hkv', [(64, 32), (16, 8)])
def test_store_kv_int8_exact(dtype, mode, page, hkv):
    from lmdeploy.turbomind.kernels.store_kv import store_kv_ref, store_kv_triton
    T, D, nb = 513, 128, 64
    g = gen(page + hkv)
    kv = (torch.randn(T, 2 * hkv * D, device=DEV, generator=g) * 2).to(dtype)
    k, v = kv[:, :hkv * D].view(T, hkv, D), kv[:, hkv * D:].view(T, hkv, D)
    slots = torch.randperm(nb * page, device=DEV, generator=g)[:T]
    slots[::7] = -1
    kc = torch.zeros(nb, page, hkv, D, dtype=torch.int8, device=DEV)
    vc, kc2, vc2 = kc.clone(), kc.clone(), kc.clone()
    qp = qparams(mode, hkv, nb, page, 3)
    qp2 = qp.clone()
    store_kv_ref(k, v, kc, vc, slots, qp)
    store_kv_triton(k, v, kc2, vc2, slots, qp2)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(qp, qp2)


def int8_attention(rows, hq, hkv, D, page, dtype, mode, seed):
    """make_attention's inputs with the caches quantised (by the reference store_kv)."""
    from lmdeploy.turbomind.kernels.store_kv import store_kv_ref
    args = list(make_attention(rows, hq, hkv, D, page, dtype, seed))
    kc, vc = args[1], args[2]
    nb = kc.shape[0]
    qp = qparams(mode, hkv, nb, page, seed)
    k8 = torch.empty(kc.shape, dtype=torch.int8, device=DEV)
    v8 = torch.empty_like(k8)
    store_kv_ref(kc.view(-1, hkv, D) * 1.5 + 0.2, vc.view(-1, hkv, D), k8, v8,
                 torch.arange(nb * page, device=DEV), qp)
    args[1], args[2] = k8, v8
    return args, qp


def check(args, qp, dtype, **kw):
    from lmdeploy.turbomind.kernels.paged_attention import (paged_attention_ref,
                                                            paged_attention_triton)
    ref = paged_attention_ref(*args, kv_qparams=qp)
    out = paged_attention_triton(*args, kv_qparams=qp, **kw)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f'rel err {err:.2e}'


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('hkv', [32, 8])
def test_decode_int8_7b_shape(mode, hkv):
    args, qp = int8_attention([(4095, 1)] * 64, 32, hkv, 128, 64, torch.float16, mode, hkv)
    check(args, qp, torch.float16)


@pytest.mark.parametrize('mode', MODES)
def test_decode_int8_fast_conversion_equals_the_cast(mode):
    """decode_cfg fast_i8 (int8 -> fp16 by bits) gives the cast's values, so the same output."""
    from lmdeploy.turbomind.kernels.paged_attention import paged_attention_triton
    args, qp = int8_attention([(n, 1) for n in (4095, 17, 1000, 2500)], 32, 8, 128, 64,
                              torch.float16, mode, 11)
    plain = paged_attention_triton(*args, kv_qparams=qp, decode_cfg=dict(fast_i8=False))
    fast = paged_attention_triton(*args, kv_qparams=qp, decode_cfg=dict(fast_i8=True))
    assert torch.equal(plain, fast)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('splits', [None, 7])
def test_decode_int8_varied_lengths(dtype, mode, splits):
    lens = torch.randint(1, 3000, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    args, qp = int8_attention([(n - 1, 1) for n in lens], 32, 8, 128, 16, dtype, mode, 5)
    check(args, qp, dtype, num_splits=splits)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', MODES)
def test_mixed_int8(dtype, mode):
    rows = [(100, 1), (2047, 1), (0, 1), (517, 1), (0, 300), (1000, 129), (63, 64), (5, 1)]
    args, qp = int8_attention(rows, 32, 8, 128, 64, dtype, mode, 9)
    check(args, qp, dtype)


@pytest.mark.parametrize('mode', MODES)
def test_decode_int8_graph_replay(mode):
    from lmdeploy.turbomind.kernels.paged_attention import (paged_attention_ref,
                                                            paged_attention_triton)
    B, D, max_len = 16, 128, 2048
    args, qp = int8_attention([(max_len - 1, 1)] * B, 32, 8, D, 64, torch.float16, mode, 21)
    q, kc, vc, bt, cu, kv_lens = args[:6]
    lens = kv_lens.clone()

    def fn():
        return paged_attention_triton(q, kc, vc, bt, cu, lens, D ** -0.5, 1, max_len, qp)

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for trial in range(3):
        lens.copy_(torch.randint(1, max_len + 1, (B,), device=DEV, generator=gen(trial),
                                 dtype=torch.int32))
        graph.replay()
        ref = paged_attention_ref(q, kc, vc, bt, cu, lens, D ** -0.5, kv_qparams=qp)
        assert rel_err(out, ref) < TOL[torch.float16]


PROMPTS = [[1, 17, 99, 256, 1024, 7], [1, 5] * 20, list(range(3, 70))]


@pytest.mark.parametrize('mode', ['per_tensor', 'online'])
@pytest.mark.parametrize('dtype', ['fp32', 'fp16'])
def test_graphs_equal_eager_int8(int8_ws, mode, dtype):
    from lmdeploy.turbomind import TurboMind
    ws = int8_ws('gqa')
    kw = dict(device='cuda', dtype=dtype, block_size=16, max_batch_size=8, quant_policy=4,
              kv_int8_scales=mode)
    with TurboMind(ws, **kw) as on, TurboMind(ws, cuda_graph=False, **kw) as off:
        assert on.engine.runner.kv_cache.pool.dtype == torch.int8
        for batch in ([PROMPTS[0]], PROMPTS, PROMPTS * 2):
            assert generate(on, batch, 24) == generate(off, batch, 24)
        assert on.engine.runner.graphs.replays > 0


@pytest.mark.parametrize('mode', ['per_tensor', 'online'])
def test_7b_int8_graphs_equal_eager(mode):
    from lmdeploy.turbomind import TurboMind
    with TurboMind(dummy='llama2-7b', device='cuda', dtype='fp16', session_len=512,
                   max_batch_size=8, max_prefill_tokens=1024, cache_max_entry_count=0.2,
                   quant_policy=4, kv_int8_scales=mode) as tm:
        runner = tm.engine.runner
        assert runner.kv_cache.pool.dtype == torch.int8
        g = torch.Generator().manual_seed(8)
        prompts = [torch.randint(3, 32000, (int(n),), generator=g).tolist()
                   for n in torch.randint(4, 40, (8,), generator=g)]
        graphs = runner.graphs
        on = generate(tm, prompts, 48)
        assert graphs.replays >= 47
        tm.engine.call(lambda: setattr(runner, 'graphs', None))
        try:
            off = generate(tm, prompts, 48, session=100)
        finally:
            tm.engine.call(lambda: setattr(runner, 'graphs', graphs))
        assert on == off
