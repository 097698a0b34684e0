"""The Triton small-M GEMM (kernels/triton_linear.py) vs ``x @ w``, on CPU through Triton's
interpreter, plus host-side checks of its launch plans at the real shapes.

As in test_kernels_triton.py, the interpreter cases run in ONE subprocess (this file as a
script, TRITON_INTERPRET=1) and the parametrised tests read its verdicts. Shapes are small and
K / N are not multiples of the blocks. Both weight layouts: w [K, N] (N contiguous) and the LM
head's ``output.t()`` (K contiguous). Errors are ||out - exact|| / ||exact|| against the
product in fp64 of the same (rounded) inputs; the bound is the rounding of the output to its
dtype (bf16: 2^-7, the interpreter truncates) plus fp32 accumulation, ~sqrt(K) 2^-24 per term.

    PYTHONPATH=. TRITON_INTERPRET=1 python tests/turbomind/test_linear_triton.py [case ...]
"""
import math
import sys
import zlib

import pytest

from tests.turbomind.interpreter_cases import case_tests, run_cases


# name -> parameters (pure data). cfg: Cfg fields (use_dot, block_m, block_n, block_k,
# split_k, num_warps, num_stages); None: the kernel's own table.
CASES = {}


def _case(name, **kw):
    CASES[name] = kw


for dt in ('float32', 'float16', 'bfloat16'):
    for M in (1, 3, 16, 33):
        _case(f'default-M{M}-{dt}', M=M, K=200, N=72, dtype=dt)
_case('gemv-m2-two-mtiles-split3', M=3, K=100, N=70, dtype='float32',
      cfg=(False, 2, 32, 16, 3, 4, 2))
_case('gemv-m4-split7', M=4, K=130, N=40, dtype='float16', cfg=(False, 4, 16, 16, 7, 4, 2))
_case('gemv-m1-rows-as-programs', M=3, K=64, N=48, dtype='float16', cfg=(False, 1, 16, 32, 2, 4, 1))
_case('gemv-split20-even', M=1, K=320, N=64, dtype='float32', cfg=(False, 1, 32, 16, 20, 4, 3))
_case('dot-split40-three-groups', M=2, K=640, N=24, dtype='float32',
      cfg=(True, 16, 16, 16, 40, 4, 2))
_case('gemv-nosplit-even', M=1, K=256, N=128, dtype='float16', cfg=(False, 1, 64, 64, 1, 4, 3))
_case('dot-m33-three-mtiles-split5', M=33, K=200, N=72, dtype='float32',
      cfg=(True, 16, 32, 16, 5, 4, 2))
_case('dot-m33-bf16-split2', M=33, K=96, N=40, dtype='bfloat16', cfg=(True, 32, 16, 32, 2, 4, 3))
_case('dot-even-nosplit', M=5, K=256, N=128, dtype='float16', cfg=(True, 16, 64, 64, 1, 4, 3))
_case('x-3d-strided', M=6, K=90, N=50, dtype='float16', x3d=True)
_case('above-threshold-is-matmul', M=65, K=64, N=40, dtype='float32')


def _tol(dtype_name, K):
    out = {'float32': 0.0, 'float16': 2.0 ** -11, 'bfloat16': 2.0 ** -7}[dtype_name]
    return out + 8 * math.sqrt(K) * 2.0 ** -24


def _rel_err(out, exact):
    return float((out.double() - exact).norm() / exact.norm().clamp_min(1e-30))


def run_case(name):
    """(ok, message); runs in the interpreter subprocess."""
    import torch

    from lmdeploy.turbomind.kernels import triton_linear as tlin
    from lmdeploy.turbomind.kernels.linear import linear_ref, linear_triton

    p = CASES[name]
    dtype = getattr(torch, p['dtype'])
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same data every run
    M, K, N = p['M'], p['K'], p['N']
    cfg = tlin.Cfg(*p['cfg']) if p.get('cfg') else None
    if p.get('x3d'):  # [2, M/2, K] with a padded row stride
        x = torch.randn(2, M // 2, K + 7, generator=g).to(dtype)[..., :K]
    else:
        x = torch.randn(M, K, generator=g).to(dtype)
    w_kn = torch.randn(K, N, generator=g).to(dtype)
    w_nk = w_kn.t().contiguous().t()  # same values, K contiguous (the LM head's output.t())
    exact = x.double() @ w_kn.double()
    tol = _tol(p['dtype'], K)
    errs, ok = [], True
    for w in (w_kn, w_nk):
        for st in tlin._STATE.values():  # a partial read before it is written shows as NaN
            for buf in st['ws']:
                buf.fill_(float('nan'))
        c = cfg or tlin.default_config(M, tlin.weight_layout(w))
        o = linear_triton(x, w, c)
        ok &= o.dtype == dtype and o.shape == exact.shape
        errs.append(_rel_err(o, exact))
        ok &= torch.equal(o, linear_triton(x, w, c))  # deterministic split-K order
        if c is None:  # above the table: cuBLAS
            ok &= torch.equal(o, linear_ref(x, w))
    for st in tlin._STATE.values():  # the last split of every tile reset its counter
        ok &= int(st['cnt'].abs().sum()) == 0
    err = max(errs)
    return (bool(ok) and err <= tol,
            f'rel_err={err:.2e} (kn {errs[0]:.1e}, nk {errs[1]:.1e}) tol={tol:.1e}')


# the pytest side: every case in the interpreter (one subprocess), one test per case
interp_results, test_linear_triton_matches_reference = case_tests(__file__, CASES)


SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 6144),
          (4096, 28672), (14336, 4096)]
LM_HEADS = [(4096, 32000), (4096, 128256)]


@pytest.mark.parametrize('M', [1, 2, 4, 8, 16, 32, 64])
def test_plans_at_real_shapes(M):
    """On a 132-SM device: every K tile is covered by exactly one split, no split is empty,
    split-K scratch and counters stay within their caps, for TUNED's config (what the model
    runs; None: cuBLAS) and DEFAULTS' (tests, sweeps; up to M_MAX)."""
    pytest.importorskip('triton')
    import torch

    from lmdeploy.turbomind.kernels import triton_linear as tlin
    dev = torch.device('cuda', 0)
    tlin._SMS[dev] = 132  # host arithmetic only: no GPU needed
    for layout, shapes in (('kn', SHAPES), ('nk', LM_HEADS)):
        for K, N in shapes:
            tuned = tlin.get_config(M, K, N, layout)
            assert tuned == tlin.TUNED.get((layout, K, N, tlin.m_bucket(M))), (layout, K, N, M)
            for cfg in filter(None, (tuned, tlin.default_config(M, layout))):
                check_plan(M, K, N, layout, cfg, dev)
    assert tlin.get_config(tlin.M_MAX + 1, 4096, 4096, 'kn') is None
    assert tlin.default_config(tlin.M_MAX + 1, 'kn') is None
    assert tlin.get_config(1, 4096, 1234, 'kn') is None  # not measured: cuBLAS


def check_plan(M, K, N, layout, cfg, dev):
    import triton

    from lmdeploy.turbomind.kernels import triton_linear as tlin
    (gn, gs, gm), split, iters = tlin.plan(M, K, N, cfg, dev)
    k_iters = triton.cdiv(K, cfg.block_k)
    assert gs == split and (split - 1) * iters < k_iters <= split * iters
    assert split <= tlin.MAX_SPLIT
    assert split == 1 or split * M * N * 4 <= tlin._WS_BYTES
    assert split == 1 or gn * gm <= tlin._NUM_COUNTERS
    if layout == 'kn' and M == 1 and not cfg.split_k:  # the decode GEMMs fill the GPU
        assert gn * gm * split >= 2 * 132, (K, N, gn, split)


def test_select_registers_linear():
    from lmdeploy.turbomind import kernels
    from lmdeploy.turbomind.kernels.linear import linear_ref
    k = kernels.select('cpu')
    assert k.linear is linear_ref and k.impl['linear'] == 'ref'


if __name__ == '__main__':
    run_cases(run_case, sys.argv[1:] or list(CASES))
