"""The Triton small-M GEMM (kernels/triton_linear.py) on a CUDA GPU, at the Llama-2-7B and
Llama-3-8B projection shapes (tp=1), eagerly and inside CUDA graphs.

Skips without CUDA. Run on the lent H100:

    python3 -m pytest -q tests/gpu/test_linear_gpu.py

Errors are ||out - exact|| / ||exact||, exact = the fp64 product of the same rounded inputs.
The bound is the output's rounding to its dtype (fp16 2^-11, bf16 2^-8, relative) with a
margin, and no worse than 1.25x cuBLAS's own error on the same inputs.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

if torch.cuda.is_available():
    pytest.importorskip('triton')
    from lmdeploy.turbomind import kernels
    from lmdeploy.turbomind.kernels import triton_linear as tlin
    from lmdeploy.turbomind.kernels.linear import linear_triton

DEV = 'cuda'
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
# (K, N, layout): the [in, out] layer weights ('kn') and the LM heads (w = output.t(), 'nk')
SHAPES = [(4096, 12288, 'kn'), (4096, 4096, 'kn'), (4096, 22016, 'kn'), (11008, 4096, 'kn'),
          (4096, 32000, 'nk'), (4096, 6144, 'kn'), (4096, 28672, 'kn'), (14336, 4096, 'kn'),
          (4096, 128256, 'nk')]
_W = {}


def weight(K, N, layout, dtype=torch.float16):
    """[K, N] operand (a view of an [N, K] matrix for 'nk'), cached per shape."""
    key = (K, N, layout, dtype)
    if key not in _W:
        if len(_W) > 2:
            _W.clear()
        g = torch.Generator(device=DEV).manual_seed(K + N)
        if layout == 'nk':
            _W[key] = (torch.randn(N, K, device=DEV, generator=g) * 0.02).to(dtype).t()
        else:
            _W[key] = (torch.randn(K, N, device=DEV, generator=g) * 0.02).to(dtype)
    return _W[key]


def rel_err(out, exact):
    assert torch.isfinite(out).all(), 'non-finite output'
    return float((out.double() - exact).norm() / exact.norm())


def check(x, w, cfg=None):
    out = linear_triton(x, w, cfg)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], w.shape[1])
    exact = x.double() @ w.double()
    err, err_cublas = rel_err(out, exact), rel_err(x @ w, exact)
    assert err <= TOL[x.dtype] and err <= 1.25 * err_cublas + 1e-5, (err, err_cublas)
    assert torch.equal(out, linear_triton(x, w, cfg)), 'split-K must be deterministic'
    return out


def counters_zero():
    return all(int(st['cnt'].abs().sum()) == 0 for st in tlin._STATE.values())


def test_select_picks_linear_triton(monkeypatch):
    monkeypatch.delenv('LMDEPLOY_KERNELS', raising=False)
    k = kernels.select('cuda')
    assert k.linear is linear_triton and k.impl['linear'] == 'triton'


@pytest.mark.parametrize('M', [1, 2, 3, 8, 16, 33, 64])
@pytest.mark.parametrize('K,N,layout', SHAPES)
def test_real_shapes_fp16(K, N, layout, M):
    x = torch.randn(M, K, device=DEV, dtype=torch.float16)
    check(x, weight(K, N, layout), tlin.default_config(M, layout))
    check(x, weight(K, N, layout))  # what the model runs: TUNED's config or cuBLAS
    assert counters_zero()


@pytest.mark.parametrize('M', [1, 4, 16, 64])
@pytest.mark.parametrize('K,N,layout', [(4096, 12288, 'kn'), (11008, 4096, 'kn'),
                                        (4096, 32000, 'nk')])
def test_real_shapes_bf16(K, N, layout, M):
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    check(x, weight(K, N, layout, torch.bfloat16), tlin.default_config(M, layout))


@pytest.mark.parametrize('cfg', [(False, 1, 128, 64, 1, 4, 3), (False, 1, 128, 64, 40, 4, 3),
                                 (False, 2, 64, 64, 7, 4, 3), (False, 4, 64, 32, 3, 4, 1),
                                 (True, 16, 64, 128, 17, 4, 4), (True, 32, 64, 64, 5, 4, 3),
                                 (True, 64, 64, 64, 2, 4, 4), (True, 64, 128, 64, 1, 8, 3)])
@pytest.mark.parametrize('M', [1, 5, 33])
def test_explicit_configs(cfg, M):
    """Split counts across the reduction groups (1, < 16, > 16), M across several M tiles."""
    cfg = tlin.Cfg(*cfg)
    for K, N, layout in ((4096, 4096, 'kn'), (4096, 32000, 'nk')):
        x = torch.randn(M, K, device=DEV, dtype=torch.float16)
        check(x, weight(K, N, layout), cfg)
    assert counters_zero()


def test_strided_x_and_large_m_fallback():
    w = weight(4096, 4096, 'kn')
    x = torch.randn(2, 3, 4096 + 64, device=DEV, dtype=torch.float16)[..., :4096]
    check(x, w)
    for M in (tlin.M_MAX + 1, 300):
        x = torch.randn(M, 4096, device=DEV, dtype=torch.float16)
        assert torch.equal(linear_triton(x, w), x @ w)  # cuBLAS above the threshold


def _layer_calls(M, dtype=torch.float16):
    """Static inputs and the weights of one decode layer + LM head (several split counts)."""
    shapes = [(4096, 12288, 'kn'), (4096, 4096, 'kn'), (11008, 4096, 'kn'), (4096, 32000, 'nk')]
    xs = [torch.randn(M, K, device=DEV, dtype=dtype) for K, _, _ in shapes]
    ws = [(torch.randn(K, N, device=DEV) * 0.02).to(dtype) if lay == 'kn'
          else (torch.randn(N, K, device=DEV) * 0.02).to(dtype).t() for K, N, lay in shapes]
    return xs, ws


@pytest.mark.parametrize('M', [1, 16])
def test_cuda_graph_replay(M):
    """Captured like cuda_graph.py (eager warm-up on the capture stream first); replays with
    new inputs in the static buffers match eager calls bit for bit."""
    xs, ws = _layer_calls(M)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x, w in zip(xs, ws):
            linear_triton(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outs = [linear_triton(x, w) for x, w in zip(xs, ws)]
    for _ in range(3):
        for x in xs:
            x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        for x, w, o in zip(xs, ws, outs):
            assert torch.equal(o, linear_triton(x, w))
            exact = x.double() @ w.double()
            assert rel_err(o, exact) <= TOL[x.dtype]
    assert counters_zero()


def test_first_call_inside_capture(monkeypatch):
    """Counters first made during a capture: their zeroing is a graph node that has not run,
    so the next eager call zeroes them; replays stay right too."""
    cfg = tlin.Cfg(False, 1, 128, 64, 16, 4, 3)
    x = torch.randn(1, 4096, device=DEV, dtype=torch.float16)
    w = weight(4096, 4096, 'kn')
    linear_triton(x, w, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    monkeypatch.setattr(tlin, '_STATE', {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_triton(x, w, cfg)
    st = tlin._STATE[x.device]
    assert st['dirty']
    exact = x.double() @ w.double()
    assert rel_err(linear_triton(x, w, cfg), exact) <= TOL[x.dtype]
    assert not st['dirty']
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, exact) <= TOL[x.dtype]
    assert counters_zero()
