"""Triton kernels vs their torch references on a CUDA GPU, at realistic shapes (fp16/bf16).

Skips without CUDA. Run on the lent H100:

    python3 -m pytest -q tests/gpu/test_kernels_gpu.py

Errors are ||out - ref|| / ||ref|| against the references run on the same GPU (fp32 softmax /
statistics inside the references), with bounds from the dtype: fp16 ~1e-3, bf16 ~1e-2.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

if torch.cuda.is_available():
    triton = pytest.importorskip('triton')
    from lmdeploy.turbomind import kernels
    from lmdeploy.turbomind.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
    from lmdeploy.turbomind.kernels.paged_attention import (paged_attention_ref,
                                                            paged_attention_triton)
    from lmdeploy.turbomind.kernels.rms_norm import rms_norm_ref, rms_norm_triton
    from lmdeploy.turbomind.kernels.rotary import rotary_embedding_ref, rotary_embedding_triton
    from lmdeploy.turbomind.kernels.rotary_store_kv import (rotary_store_kv_ref,
                                                            rotary_store_kv_triton)
    from lmdeploy.turbomind.kernels.store_kv import store_kv_ref, store_kv_triton
    from lmdeploy.turbomind.step_input import RowPlan, build_step_input

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}
DEV = 'cuda'


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), 'non-finite output'
    return float((out - ref).norm() / ref.norm())


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def test_select_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv('LMDEPLOY_KERNELS', raising=False)
    k = kernels.select('cuda')
    assert set(k.impl.values()) == {'triton'}, k


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('T', [1, 64, 1000])
@pytest.mark.parametrize('residual', [False, True])
def test_rms_norm(dtype, T, residual):
    g = gen(T)
    H = 4096
    x = torch.randn(T, H, device=DEV, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(H, device=DEV, generator=g)).to(dtype)
    if residual:
        r = torch.randn(T, H, device=DEV, generator=g).to(dtype)
        o, nr = rms_norm_triton(x, w, 1e-5, r)
        ro, rnr = rms_norm_ref(x, w, 1e-5, r)
        assert torch.equal(nr, rnr)
    else:
        o, ro = rms_norm_triton(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)
    assert o.dtype == ro.dtype
    assert rel_err(o, ro) < TOL[dtype] / 2


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('T', [1, 77, 2048])
def test_silu_and_mul(dtype, T):
    x = (torch.randn(T, 2 * 11008, device=DEV, generator=gen(T)) * 3).to(dtype)
    assert rel_err(silu_and_mul_triton(x), silu_and_mul_ref(x)) < TOL[dtype] / 2


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('hq,hkv,D,rotary_dim,theta', [(32, 32, 128, 128, 1e4),
                                                       (32, 8, 128, 128, 5e5),
                                                       (16, 4, 96, 64, 1e4)])
def test_rotary(dtype, hq, hkv, D, rotary_dim, theta):
    T = 300
    g = gen(hq + hkv)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV, generator=g).to(dtype)
    q, k, _ = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k = q.reshape(T, hq, D), k.reshape(T, hkv, D)  # strided views, as in llama.py
    pos = torch.randint(0, 8192, (T,), device=DEV, generator=g)
    rq, rk = rotary_embedding_ref(q.clone(), k.clone(), pos, rotary_dim, theta)
    before = qkv.clone()
    oq, ok = rotary_embedding_triton(q, k, pos, rotary_dim, theta)
    assert oq.data_ptr() == q.data_ptr() and ok.data_ptr() == k.data_ptr()
    assert rel_err(oq, rq) < TOL[dtype] / 2 and rel_err(ok, rk) < TOL[dtype] / 2
    assert torch.equal(qkv[:, (hq + hkv) * D:], before[:, (hq + hkv) * D:])  # v untouched
    assert torch.equal(oq[..., rotary_dim:], before[:, :hq * D].view(T, hq, D)[..., rotary_dim:])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('page,hkv', [(64, 32), (16, 8), (64, 8)])
def test_store_kv(dtype, page, hkv):
    T, D, nb = 513, 128, 64
    g = gen(page + hkv)
    kv = torch.randn(T, 2 * hkv * D, device=DEV, generator=g).to(dtype)
    k, v = kv[:, :hkv * D].view(T, hkv, D), kv[:, hkv * D:].view(T, hkv, D)
    slots = torch.randperm(nb * page, device=DEV, generator=g)[:T]
    slots[::7] = -1
    kc = torch.randn(nb, page, hkv, D, device=DEV, generator=g).to(dtype)
    vc = torch.randn(nb, page, hkv, D, device=DEV, generator=g).to(dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc, vc, slots)
    store_kv_triton(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def rotary_store_kv_case(T, hq, hkv, D, rotary_dim, dtype, quant, seed, page=64):
    """A fused qkv output, positions, slots (every 5th negative), pools and kv_qparams; returns
    `run(fn) -> (qkv buffer, returned q, k_cache, v_cache, qparams)` on fresh copies, and the
    pool rows written."""
    g = gen(seed)
    nb = triton.cdiv(T, page) * 2 + 2
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV, generator=g).to(dtype)
    pos = torch.randint(0, 8192, (T,), device=DEV, generator=g)
    slots = torch.randperm(nb * page, device=DEV, generator=g)[:T]
    slots[1::5] = -1
    if quant is None:
        kc = torch.randn(nb, page, hkv, D, device=DEV, generator=g).to(dtype)
        vc, qp = torch.randn_like(kc), None
    else:
        kc = torch.randint(-128, 128, (nb, page, hkv, D), device=DEV, generator=g,
                           dtype=torch.int8)
        vc = kc.flip(0)
        qp = (torch.tensor([[0.03], [0.1], [0.02], [-0.05]], device=DEV).repeat(1, hkv)
              if quant == 'static' else torch.zeros(2, nb, hkv, page, device=DEV))

    def run(fn):
        buf = qkv.clone()
        q, k, v = (x.view(T, -1, D) for x in buf.split([hq * D, hkv * D, hkv * D], dim=-1))
        c = (kc.clone(), vc.clone(), None if qp is None else qp.clone())
        out = fn(q, k, v, pos, rotary_dim, 1e4, c[0], c[1], slots, c[2])
        return (buf, out) + c

    return run, slots[slots >= 0]


def separate_rotary_store_kv(q, k, v, pos, rotary_dim, theta, kc, vc, slots, qp):
    q, k = rotary_embedding_triton(q, k, pos, rotary_dim, theta)
    store_kv_triton(k, v, kc, vc, slots, qp)
    return q


def assert_as_accurate(fused, sep, ref, names, dtype):
    """The fused kernel against the separate ones it replaces: where the compiler contracts
    the angle's and the rotation's multiply-adds differently, bf16 results at positions ~2000
    may round to a neighbouring value (H100: a few elements of 262144 by up to 0.0156), so
    the check is accuracy, not bits: against the reference, the fused results' relative error
    is within 2% of the separate kernels' or below an eighth of `dtype`'s rounding (the pool
    is mostly exact, so a few rounded elements weigh ~1e-6; H100: at most 7.6e-6 in fp16), and
    int8 values are within one integer step of theirs."""
    for a, b, r, name in zip(fused, sep, ref, names):
        if a is None:
            continue
        if a.dtype == torch.int8:
            assert int((a.int() - b.int()).abs().max()) <= 1, name
        else:
            bound = max(1.02 * rel_err(b, r), torch.finfo(dtype).eps / 8)
            assert rel_err(a, r) <= bound, (name, rel_err(a, r), rel_err(b, r))


def assert_same_bits(outs, wants, names):
    for a, b, name in zip(outs, wants, names):
        if a is None:
            continue
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32}[a.element_size()]
        diff = a.view(ints) != b.view(ints)
        assert not diff.any(), (f'{name}: {int(diff.sum())} of {diff.numel()} differ, max '
                                f'{float((a.double() - b.double()).abs().max()):.3g}')


@pytest.mark.parametrize('quant', [None, 'static', 'online'])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('hq,hkv,D,rotary_dim', [(32, 32, 128, 128), (32, 8, 128, 128),
                                                 (16, 4, 96, 64)])
@pytest.mark.parametrize('T', [1, 64, 2048])
def test_rotary_store_kv(T, hq, hkv, D, rotary_dim, dtype, quant):
    """The fused kernel is as accurate as the separate Triton kernels (q, pools, online
    scales), leaves k and v in the qkv buffer as they were, and is close to the reference."""
    run, rows = rotary_store_kv_case(T, hq, hkv, D, rotary_dim, dtype, quant,
                                     seed=T + hq + hkv)
    fused = run(rotary_store_kv_triton)
    sep = run(separate_rotary_store_kv)
    ref = run(rotary_store_kv_ref)
    assert fused[1].data_ptr() == fused[0].data_ptr()
    assert_as_accurate(fused[1:], sep[1:], ref[1:], ('returned q', 'k_cache', 'v_cache',
                                                     'kv_qparams'), dtype)
    assert torch.equal(fused[0][:, hq * D:], ref[0][:, hq * D:])  # k, v not written
    # vs the reference: rotary is close (not bitwise), the v half of store_kv exact
    assert rel_err(fused[1], ref[1]) < TOL[dtype] / 2
    assert torch.equal(fused[3], ref[3])
    k_new, k_ref = (r[2].view(-1, hkv, D)[rows] for r in (fused, ref))
    if quant is None:
        assert rel_err(k_new, k_ref) < TOL[dtype] / 2
    else:  # a rounding step apart where the rotated k (or its online scale) differs
        assert int((k_new.int() - k_ref.int()).abs().max()) <= 1
        assert rel_err(fused[4], ref[4]) < TOL[dtype] / 2


def test_rotary_store_kv_cuda_graph():
    """Captured once, replayed with new positions and slots: the eager results."""
    T, hq, hkv, D = 16, 32, 8, 128
    run, _ = rotary_store_kv_case(T, hq, hkv, D, D, torch.float16, 'online', seed=3)
    new_pos = torch.randint(0, 8192, (T,), device=DEV, generator=gen(9))

    def replayed(q, k, v, pos, rd, theta, kc, vc, slots, qp):
        pos, slots, q_in = pos.clone(), slots.clone(), q.clone()
        fn = lambda: rotary_store_kv_triton(q, k, v, pos, rd, theta, kc, vc, slots, qp)  # noqa
        fn()  # compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        pos.copy_(new_pos)
        slots.copy_(slots.flip(0))  # the same rows: the warm-up's writes are all overwritten
        q.copy_(q_in)
        graph.replay()
        return q

    def eager(q, k, v, pos, rd, theta, kc, vc, slots, qp):
        return rotary_store_kv_triton(q, k, v, new_pos, rd, theta, kc, vc, slots.flip(0), qp)

    assert_same_bits(run(replayed)[1:], run(eager)[1:], ('q', 'k_cache', 'v_cache', 'qparams'))


def make_attention(rows, hq, hkv, D, page, dtype, seed, extra_blocks=8):
    """rows: [(num_cached, q_len)]; blocks scattered at random over the pool."""
    g = gen(seed)
    need = [-(-(c + n) // page) for c, n in rows]
    nb = sum(need) + extra_blocks
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed)).tolist()
    plans, i = [], 0
    for (c, n), k in zip(rows, need):
        plans.append(RowPlan(tokens=[1] * n, num_cached=c, block_ids=perm[i:i + k]))
        i += k
    step = build_step_input(plans, page, device=DEV)
    T = step.num_tokens
    q = torch.randn(T, hq, D, device=DEV, generator=g).to(dtype)
    kc = torch.randn(nb, page, hkv, D, device=DEV, generator=g).to(dtype)
    vc = torch.randn(nb, page, hkv, D, device=DEV, generator=g).to(dtype)
    return (q, kc, vc, step.block_table, step.cu_seqlens, step.kv_lens, D ** -0.5,
            step.max_q_len, step.max_kv_len)


def check_attention(args, dtype, **kw):
    ref = paged_attention_ref(*args)
    out = paged_attention_triton(*args, **kw)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f'rel err {err:.2e}'
    return err


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('hkv', [32, 8])
def test_decode_7b_shape(dtype, hkv):
    """Batch 64, context 4096, 32 query heads, head_dim 128, block 64 (MHA and GQA 8)."""
    args = make_attention([(4095, 1)] * 64, 32, hkv, 128, 64, dtype, seed=hkv)
    check_attention(args, dtype)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('splits', [None, 1, 7])
def test_decode_varied_lengths(dtype, splits):
    g = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 3000, (37,), generator=g).tolist()
    args = make_attention([(n - 1, 1) for n in lens], 32, 8, 128, 16, dtype, seed=5)
    check_attention(args, dtype, num_splits=splits)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('hq,hkv,page', [(32, 32, 64), (32, 8, 16), (28, 4, 64)])
def test_mixed_decode_and_prefill(dtype, hq, hkv, page):
    rows = [(100, 1), (2047, 1), (0, 1), (517, 1),      # decode rows
            (0, 300), (1000, 129), (63, 64), (5, 1)]     # whole prompt, chunks on a prefix
    args = make_attention(rows, hq, hkv, 128, page, dtype, seed=hq + hkv + page)
    check_attention(args, dtype)


def test_step_shapes_compile_no_new_variants():
    """Once each kind of launch (decode or mixed, one partition or split-K) has run, steps of
    other batch sizes, contexts and block-table widths reuse the compiled kernels: a new
    variant would be a compile (a second or so) inside some request's latency."""
    def run(rows, seed):
        args = make_attention(rows, 32, 8, 128, 64, torch.float16, seed=seed)
        paged_attention_triton(*args)

    # decode / mixed, each with one partition per row (64 rows of 64) and split-K (one row)
    for rows in ([(63, 1)] * 64, [(3000, 1)], [(63, 1)] * 64 + [(0, 64)],
                 [(3000, 1), (0, 300)]):
        run(rows, 0)
    torch.cuda.synchronize()
    before = kernels.compiled_variants()
    assert before > 0
    g = torch.Generator().manual_seed(7)
    for i in range(24):
        B = int(torch.randint(1, 90, (1,), generator=g))
        ctx = torch.randint(0, 3500, (B,), generator=g).tolist()
        rows = [(c, 1) for c in ctx]
        if i % 2:  # a prompt chunk too, alone or over a cached prefix
            rows.append((int(ctx[0]) if i % 4 == 1 else 0, 1 + i * 37))
        run(rows, i)
    torch.cuda.synchronize()
    assert kernels.compiled_variants() == before


@pytest.mark.parametrize('dtype', DTYPES)
def test_long_prefill(dtype):
    args = make_attention([(1000, 2048)], 32, 8, 128, 64, dtype, seed=11)
    check_attention(args, dtype)


@pytest.mark.parametrize('D', [64, 80])
def test_other_head_dims(D):
    args = make_attention([(50, 1), (200, 1), (30, 40)], 8, 2, D, 16, torch.float16, seed=D)
    check_attention(args, torch.float16)
    args = make_attention([(50, 1), (200, 1)], 8, 2, D, 16, torch.float16, seed=D + 1)
    check_attention(args, torch.float16)


def test_decode_cuda_graph_replay():
    """Captured once with a max_kv_len hint, replayed for other kv_lens: no host syncs."""
    dtype, B, hq, hkv, D, page, max_len = torch.float16, 16, 32, 8, 128, 64, 2048
    args = list(make_attention([(max_len - 1, 1)] * B, hq, hkv, D, page, dtype, seed=21))
    q, kc, vc, bt, cu, kv_lens = args[:6]
    lens_buf = kv_lens.clone()
    fn = lambda: paged_attention_triton(q, kc, vc, bt, cu, lens_buf, D ** -0.5, 1, max_len)  # noqa
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for trial in range(3):
        new = torch.randint(1, max_len + 1, (B,), device=DEV, generator=gen(trial),
                            dtype=torch.int32)
        lens_buf.copy_(new)
        graph.replay()
        ref = paged_attention_ref(q, kc, vc, bt, cu, lens_buf, D ** -0.5)
        assert rel_err(out, ref) < TOL[dtype]


def test_layer_ops_cuda_graph():
    """rms_norm + rotary + store_kv + silu_and_mul capture in a graph and match eager."""
    T, H, hq, hkv, D, page = 8, 4096, 32, 8, 128, 16
    g = gen(7)
    x = torch.randn(T, H, device=DEV, generator=g).half()
    r = torch.randn(T, H, device=DEV, generator=g).half()
    w = torch.ones(H, device=DEV).half()
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV, generator=g).half()
    pos = torch.arange(T, device=DEV) + 100
    kc = torch.zeros(4, page, hkv, D, device=DEV).half()
    vc = torch.zeros_like(kc)
    slots = torch.arange(T, device=DEV) + 5
    gu = torch.randn(T, 2 * 1024, device=DEV, generator=g).half()

    def step(qkv_in):
        o, nr = rms_norm_triton(x, w, 1e-5, r)
        q, k, v = qkv_in.split([hq * D, hkv * D, hkv * D], dim=-1)
        q, k = rotary_embedding_triton(q.view(T, hq, D), k.view(T, hkv, D), pos, D, 1e4)
        store_kv_triton(k, v.view(T, hkv, D), kc, vc, slots)
        return o, nr, q, silu_and_mul_triton(gu)

    eager = [t.clone() for t in step(qkv.clone())]
    kc_e, vc_e = kc.clone(), vc.clone()
    buf = qkv.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(buf)
    buf.copy_(qkv)
    kc.zero_()
    vc.zero_()
    graph.replay()
    for a, b in zip(outs, eager):
        assert torch.equal(a, b)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)


def check_prompt_attention(fn, T, hq, hkv, dtype, seed):
    """`fn` on strided q/k/v views of a qkv buffer against the fp32 reference."""
    from lmdeploy.turbomind.kernels.prompt_attention import prompt_attention_ref
    D = 128
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV, dtype=dtype, generator=gen(seed))
    q, k, v = (x.view(T, -1, D) for x in qkv.split([hq * D, hkv * D, hkv * D], dim=-1))
    out = fn(q, k, v, D ** -0.5)
    ref = prompt_attention_ref(q, k, v, D ** -0.5)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('hq,hkv', [(32, 32), (32, 8)])
@pytest.mark.parametrize('T', [2, 100, 2048])
def test_prompt_attention_cuda(T, hq, hkv, dtype):
    """torch SDPA (cuDNN on the H100: the dense path from 3072 tokens)."""
    from lmdeploy.turbomind.kernels.prompt_attention import prompt_attention_cuda
    check_prompt_attention(prompt_attention_cuda, T, hq, hkv, dtype, seed=T + hkv)


@pytest.mark.parametrize('dtype', DTYPES + [torch.float32])
@pytest.mark.parametrize('hq,hkv', [(32, 32), (32, 8)])
@pytest.mark.parametrize('T', [1, 100, 1025, 2048, 3100])
def test_prompt_attention_triton(T, hq, hkv, dtype):
    """The Triton dense prompt attention (the engine's choice on CUDA), with the tiles it
    picks for the device (fp32: smaller ones that fit its shared memory); 3100 tokens go to
    cuDNN."""
    from lmdeploy.turbomind.kernels.triton_prompt_attention import prompt_attention_triton
    check_prompt_attention(prompt_attention_triton, T, hq, hkv, dtype, seed=T + hq)


@pytest.mark.parametrize('V', [32000, 128256])
@pytest.mark.parametrize('S', [1, 4, 64])
def test_sample_tokens(V, S):
    """The sampler's last step. Argmax (with and without bad words): the reference's ids. Draws
    (temperatures, greedy rows, bad words): a valid inverse-CDF answer for each row against an
    fp64 CDF (fp32 sums in another order may move a draw near a boundary to the next id), and
    mostly the reference's id on peaked logits (like a model's); flat ones check the CDF only."""
    from lmdeploy.turbomind.kernels.sample import sample_tokens_ref
    from lmdeploy.turbomind.kernels.triton_sample import sample_tokens_triton
    from tests.turbomind.draw_oracle import valid_draws
    g = gen(V + S)
    for spread in (8.0, 1.0):
        x = torch.randn(S, V, device=DEV, generator=g) * spread
        bad = torch.randint(-1, V, (S, 8), device=DEV, generator=g)
        bad[:, 0] = x.argmax(dim=1)
        for args in ((x,), (x, bad)):
            assert torch.equal(sample_tokens_triton(*args), sample_tokens_ref(*args))
        temp = 0.2 + 1.5 * torch.rand(S, device=DEV, generator=g)
        temp[::3] = 0.0
        greedy = temp == 0
        keys = torch.randint(-2 ** 63, 2 ** 63 - 1, (S,), device=DEV, generator=g)
        counters = torch.randint(0, 2 ** 40, (S,), device=DEV, generator=g)
        for b, t, gr in ((bad, temp, greedy), (None, None, None)):
            got = sample_tokens_triton(x, b, t, gr, keys, counters)
            want = sample_tokens_ref(x, b, t, gr, keys, counters)
            ok = valid_draws(x, b, t, gr, keys, counters, got)
            assert bool(ok.all()), f'rows {ok.logical_not().nonzero().flatten().tolist()} wrong'
            if spread > 1:  # peaked rows: ids far apart in probability mass
                assert float((got == want).float().mean()) >= 0.9
            if b is not None:
                assert not (got[:, None] == b).any()
