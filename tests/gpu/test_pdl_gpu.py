"""Programmatic dependent launch (kernels/pdl.py) on a CUDA GPU: a decode layer's chain of
Triton kernels gives bit-identical results with PDL on and off, eagerly and replayed many times
from a CUDA graph (a kernel reading its predecessor's output too early would show up as a
mismatch in some replay).

Skips without CUDA; the PDL half skips below sm_90. Run on the lent H100:

    python3 -m pytest -q tests/gpu/test_pdl_gpu.py
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

if torch.cuda.is_available():
    pytest.importorskip('triton')
    from lmdeploy.turbomind import kernels
    from lmdeploy.turbomind.kernels import pdl

DEV = 'cuda'
H, INTER, HEADS, D, PAGE = 1024, 2816, 8, 128, 64


def _has_pdl():
    return pdl._triton_has_pdl() and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture
def pdl_switch():
    """set(on): PDL on or off for the current device, restored afterwards."""
    idx = torch.cuda.current_device()
    saved = dict(pdl._ENABLED)

    def set_(on):
        pdl._ENABLED[idx] = pdl._ENABLED[None] = on
    with pdl.decode_scope(True):  # as the model opens it for decode-only steps
        yield set_
    pdl._ENABLED.clear()
    pdl._ENABLED.update(saved)


def _layer_inputs(rows, ctx, dtype=torch.float16):
    g = torch.Generator(device=DEV).manual_seed(rows * 1000 + ctx)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * s).to(dtype)
    blocks = rows * ((ctx + PAGE) // PAGE + 1)
    t = dict(h=rnd(rows, H), res=rnd(rows, H), nw=rnd(H, s=0.1) + 1, w_qkv=rnd(H, 3 * H, s=0.03),
             wo=rnd(H, H, s=0.03), w13=rnd(H, 2 * INTER, s=0.03), w2=rnd(INTER, H, s=0.02),
             k_cache=rnd(blocks, PAGE, HEADS, D), v_cache=rnd(blocks, PAGE, HEADS, D))
    per_row = blocks // rows
    t['block_table'] = torch.arange(blocks, device=DEV, dtype=torch.int32).view(rows, per_row)
    t['kv_lens'] = torch.full((rows,), ctx, device=DEV, dtype=torch.int32)
    t['cu'] = torch.arange(rows + 1, device=DEV, dtype=torch.int32)
    t['pos'] = t['kv_lens'].long() - 1
    t['slots'] = (t['block_table'][:, (ctx - 1) // PAGE].long() * PAGE + (ctx - 1) % PAGE)
    return t


def _layer(k, t, ctx):
    """One decode layer, the model's order of kernels (models/llama.py)."""
    rows = t['h'].shape[0]
    x, res = k.rms_norm(t['h'], t['nw'], 1e-5, t['res'])
    qkv = k.linear(x, t['w_qkv'])
    q, kk, v = (a.reshape(rows, HEADS, D) for a in qkv.split([H, H, H], dim=-1))
    q = k.rotary_store_kv(q, kk, v, t['pos'], D, 10000.0, t['k_cache'], t['v_cache'],
                          t['slots'])
    o = k.paged_attention(q, t['k_cache'], t['v_cache'], t['block_table'], t['cu'],
                          t['kv_lens'], D ** -0.5, 1, ctx)
    h = k.linear(o.reshape(rows, H), t['wo'])
    x, res = k.rms_norm(h, t['nw'], 1e-5, res)
    return k.linear(k.silu_and_mul(k.linear(x, t['w13'])), t['w2']) + res


@pytest.mark.parametrize('rows,ctx', [(1, 300), (4, 1100)])
def test_layer_chain_equal_with_and_without_pdl(pdl_switch, rows, ctx):
    if not _has_pdl():
        pytest.skip('PDL needs sm_90+ and a Triton with gdc_wait')
    k = kernels.select(DEV)
    outs = {}
    for on in (False, True):
        pdl_switch(on)
        t = _layer_inputs(rows, ctx)
        eager = _layer(k, t, ctx)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = _layer(k, t, ctx)
        replays = []
        for _ in range(200):
            g.replay()
            replays.append(out.clone())
        torch.cuda.synchronize()
        for i, r in enumerate(replays):
            assert torch.equal(r, eager), f'PDL {on}: replay {i} differs from eager'
        outs[on] = eager
    assert torch.equal(outs[True], outs[False])


def test_pdl_is_on_where_supported(monkeypatch):
    pdl._ENABLED.clear()
    monkeypatch.delenv('LMDEPLOY_PDL', raising=False)
    dev = torch.device(DEV)
    assert pdl.pdl_enabled(dev) == _has_pdl()
    assert 'launch_pdl' not in pdl.launch_opts(dev)  # outside a decode-only step
    with pdl.decode_scope(True):
        assert ('launch_pdl' in pdl.launch_opts(dev)) == _has_pdl()
        with pdl.decode_scope(False):
            assert 'launch_pdl' not in pdl.launch_opts(dev)
    pdl._ENABLED.clear()
    monkeypatch.setenv('LMDEPLOY_PDL', '0')
    assert not pdl.pdl_enabled(torch.device(DEV))
    pdl._ENABLED.clear()
