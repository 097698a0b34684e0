"""Torch reference kernels against naive formulations."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmdeploy.turbomind import kernels
from lmdeploy.turbomind.kernels import (paged_attention_ref, rms_norm_ref, rotary_embedding_ref,
                                        rotary_store_kv_ref, silu_and_mul_ref, store_kv_ref)
from lmdeploy.turbomind.step_input import RowPlan, build_step_input


def test_select_picks_reference_on_cpu(monkeypatch):
    monkeypatch.delenv('LMDEPLOY_KERNELS', raising=False)
    k = kernels.select('cpu')
    assert set(k.impl.values()) == {'ref'}
    assert k.paged_attention is paged_attention_ref and k.rms_norm is rms_norm_ref
    assert k.rotary_store_kv is rotary_store_kv_ref
    assert set(k.impl) == set(kernels.OPS)
    with pytest.raises(ValueError):
        kernels.select('cpu', impl='fast')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 48, generator=g).to(dtype)
    r = torch.randn(7, 48, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    eps = 1e-6

    def naive(h):
        hf = h.double()
        return (w.double() * hf / torch.sqrt((hf * hf).mean(-1, keepdim=True) + eps))

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(rms_norm_ref(x, w, eps).double(), naive(x), atol=tol, rtol=tol)
    out, new_res = rms_norm_ref(x, w, eps, r)
    assert torch.equal(new_res, x + r)
    torch.testing.assert_close(out.double(), naive(x + r), atol=tol, rtol=tol)
    assert out.dtype == dtype


@pytest.mark.parametrize('head_dim,rotary_dim,theta', [(16, 16, 10000.0), (128, 128, 10000.0),
                                                       (24, 16, 500000.0)])
def test_rotary_interleaved_vs_complex(head_dim, rotary_dim, theta):
    g = torch.Generator().manual_seed(1)
    T, hq, hkv = 9, 4, 2
    q = torch.randn(T, hq, head_dim, generator=g)
    k = torch.randn(T, hkv, head_dim, generator=g)
    pos = torch.tensor([0, 1, 2, 7, 100, 3, 4096, 5, 2047])
    q2, k2 = rotary_embedding_ref(q.clone(), k.clone(), pos, rotary_dim, theta)

    def complex_rot(x):
        i = torch.arange(rotary_dim // 2, dtype=torch.float64)
        freq = theta ** (-2 * i / rotary_dim)
        angle = pos.double()[:, None] * freq[None]  # [T, rd/2]
        xc = torch.view_as_complex(x[..., :rotary_dim].double().reshape(
            *x.shape[:-1], rotary_dim // 2, 2).contiguous())
        rot = torch.view_as_real(xc * torch.polar(torch.ones_like(angle), angle)[:, None])
        return torch.cat([rot.flatten(-2), x[..., rotary_dim:].double()], -1)

    torch.testing.assert_close(q2.double(), complex_rot(q), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(k2.double(), complex_rot(k), atol=2e-4, rtol=1e-4)
    assert torch.equal(q2[..., rotary_dim:], q[..., rotary_dim:])


def test_rotary_equals_rotate_half_after_permutation():
    """Interleaved rotary on permuted dims == transformers' rotate-half on the original dims
    (why deploy permutes HF q/k weights)."""
    g = torch.Generator().manual_seed(2)
    D, T = 16, 5
    x = torch.randn(T, 3, D, generator=g)
    pos = torch.arange(T) * 13
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)[:, None]
    half = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    hf = x * ang.cos() + half * ang.sin()
    perm = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], -1).flatten()
    ours, _ = rotary_embedding_ref(x[..., perm], x[..., perm], pos, D, 10000.0)
    torch.testing.assert_close(ours, hf[..., perm], atol=1e-5, rtol=1e-5)


def test_store_kv_writes_slots_and_skips_negative():
    nb, bs, h, d = 4, 3, 2, 5
    kc = torch.zeros(nb, bs, h, d)
    vc = torch.zeros(nb, bs, h, d)
    k = torch.randn(4, h, d)
    v = torch.randn(4, h, d)
    slots = torch.tensor([7, 0, -1, 11])
    store_kv_ref(k, v, kc, vc, slots)
    assert torch.equal(kc[2, 1], k[0]) and torch.equal(vc[2, 1], v[0])
    assert torch.equal(kc[0, 0], k[1]) and torch.equal(kc[3, 2], k[3])
    assert int((kc.abs().sum((-1, -2)) > 0).sum()) == 3
    store_kv_ref(k[:2], v[:2], kc, vc, torch.tensor([1, 2]))
    assert torch.equal(vc[0, 1], v[0]) and torch.equal(vc[0, 2], v[1])


@pytest.mark.parametrize('quant', [None, 'static', 'online'])
def test_rotary_store_kv_is_rotary_then_store(quant):
    """On column views of a fused qkv output, with a negative slot and partial rotary: the
    returned q and the pool are those of rotary_embedding + store_kv; k, v are not written."""
    g = torch.Generator().manual_seed(5)
    T, hq, hkv, D, rd, nb, bs = 6, 4, 2, 24, 16, 5, 4
    qkv = torch.randn(T, (hq + 2 * hkv) * D, generator=g).half()
    before = qkv.clone()
    q, k, v = (x.view(T, -1, D) for x in qkv.split([hq * D, hkv * D, hkv * D], dim=-1))
    pos = torch.tensor([0, 5, 17, 300, 2, 4095])
    slots = torch.tensor([3, -1, 0, 19, 8, 12])
    if quant is None:
        kc, vc, qp = torch.randn(nb, bs, hkv, D).half(), torch.randn(nb, bs, hkv, D).half(), None
    else:
        kc = torch.randint(-128, 128, (nb, bs, hkv, D), generator=g, dtype=torch.int8)
        vc = kc.flip(0)
        qp = (torch.tensor([[0.02], [0.1], [0.03], [-0.1]]).repeat(1, hkv) if quant == 'static'
              else torch.zeros(2, nb, hkv, bs))
    kc2, vc2 = kc.clone(), vc.clone()
    qp2 = None if qp is None else qp.clone()
    want_q, rk = rotary_embedding_ref(q, k, pos, rd, 1e4)
    store_kv_ref(rk, v, kc2, vc2, slots, qp2)
    out_q = rotary_store_kv_ref(q, k, v, pos, rd, 1e4, kc, vc, slots, qp)
    assert torch.equal(out_q, want_q) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert qp is None or torch.equal(qp, qp2)
    assert torch.equal(qkv, before)
    if quant is None:  # the pool holds the rotated k; the skipped token's q is still rotated
        assert torch.equal(kc.view(-1, hkv, D)[19], rk[3]) and not torch.equal(rk[3], k[3])
        assert torch.equal(out_q[1], rotary_embedding_ref(q[1:2], k[1:2], pos[1:2], rd, 1e4)[0][0])


def test_silu_and_mul():
    x = torch.randn(6, 20)
    torch.testing.assert_close(silu_and_mul_ref(x), F.silu(x[:, :10]) * x[:, 10:])


def dense_causal(q, k, v, n_new):
    """Naive attention of the last n_new queries over full k/v ([L, h, D]), GQA by repeat."""
    L, hkv, D = k.shape
    hq = q.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1).double()
    v = v.repeat_interleave(hq // hkv, dim=1).double()
    out = torch.empty(n_new, hq, D, dtype=torch.float64)
    for i in range(n_new):
        p = L - n_new + i
        s = torch.einsum('hd,lhd->hl', q[i].double(), k[:p + 1]) / math.sqrt(D)
        out[i] = torch.einsum('hl,lhd->hd', torch.softmax(s, -1), v[:p + 1])
    return out


@pytest.mark.parametrize('hq,hkv,D,block_size', [(4, 4, 16, 4), (8, 2, 24, 3), (2, 1, 128, 5),
                                                (6, 3, 40, 1)])
def test_paged_attention_vs_dense(hq, hkv, D, block_size):
    """Decode rows, a whole prompt and prompt chunks over cached prefixes in one call."""
    g = torch.Generator().manual_seed(3)
    # (cached prefix, new tokens) per row: decode, decode, prompt, chunk over prefix, chunk
    shapes = [(9, 1), (1, 1), (0, 7), (5, 3), (12, 4)]
    num_blocks = 64
    kc = torch.zeros(num_blocks, block_size, hkv, D)
    vc = torch.zeros(num_blocks, block_size, hkv, D)
    free = torch.randperm(num_blocks, generator=g).tolist()
    rows, full_k, full_v, qs = [], [], [], []
    for cached, n in shapes:
        L = cached + n
        blocks = [free.pop() for _ in range(-(-L // block_size))]
        k = torch.randn(L, hkv, D, generator=g)
        v = torch.randn(L, hkv, D, generator=g)
        for p in range(cached):  # the cached prefix is already in the pool
            kc[blocks[p // block_size], p % block_size] = k[p]
            vc[blocks[p // block_size], p % block_size] = v[p]
        rows.append(RowPlan(list(range(n)), cached, blocks, 'last'))
        full_k.append(k), full_v.append(v)
        qs.append(torch.randn(n, hq, D, generator=g))
    step = build_step_input(rows, block_size)
    step.validate(block_size, num_blocks)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes)])
    store_kv_ref(new_k, new_v, kc, vc, step.slot_mapping)
    q = torch.cat(qs)
    out = paged_attention_ref(q, kc, vc, step.block_table, step.cu_seqlens, step.kv_lens,
                              D ** -0.5, step.max_q_len, step.max_kv_len)
    assert out.shape == q.shape and out.dtype == q.dtype
    cu = step.cu_seqlens.tolist()
    for b, (cached, n) in enumerate(shapes):
        want = dense_causal(qs[b], full_k[b], full_v[b], n)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]].double(), want, atol=1e-5, rtol=1e-5)


def test_paged_attention_matches_sdpa_on_a_prompt():
    g = torch.Generator().manual_seed(4)
    T, hq, hkv, D, bs = 11, 4, 2, 16, 4
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (hq, hkv, hkv))
    kc, vc = torch.zeros(8, bs, hkv, D), torch.zeros(8, bs, hkv, D)
    step = build_step_input([RowPlan(list(range(T)), 0, [6, 1, 3], 'all')], bs)
    store_kv_ref(k, v, kc, vc, step.slot_mapping)
    out = paged_attention_ref(q, kc, vc, step.block_table, step.cu_seqlens, step.kv_lens,
                              D ** -0.5)
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('hq,hkv', [(4, 2), (4, 4)])
def test_prompt_attention_is_paged_attention_of_a_fresh_prompt(hq, hkv):
    """prompt_attention's contract: paged_attention of one row with no cached prefix, K/V
    taken from strided views of a qkv buffer; its CUDA variant (SDPA) agrees on CPU too."""
    from lmdeploy.turbomind.kernels.prompt_attention import (prompt_attention_cuda,
                                                             prompt_attention_ref)
    g = torch.Generator().manual_seed(7)
    T, D, bs = 13, 16, 4
    qkv = torch.randn(T, (hq + 2 * hkv) * D, generator=g)
    q, k, v = (x.view(T, -1, D) for x in qkv.split([hq * D, hkv * D, hkv * D], dim=-1))
    kc, vc = torch.zeros(8, bs, hkv, D), torch.zeros(8, bs, hkv, D)
    step = build_step_input([RowPlan(list(range(T)), 0, [6, 1, 3, 0], 'all')], bs)
    store_kv_ref(k, v, kc, vc, step.slot_mapping)
    want = paged_attention_ref(q, kc, vc, step.block_table, step.cu_seqlens, step.kv_lens,
                               D ** -0.5)
    torch.testing.assert_close(prompt_attention_ref(q, k, v, D ** -0.5), want, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(prompt_attention_cuda(q, k, v, D ** -0.5), want, atol=1e-5,
                               rtol=1e-5)


def test_dense_prompt_attention_tiles_fit_shared_memory():
    """The Triton dense prompt kernel's tiles: the H100's tuned ones for fp16 / bf16 at head
    size 128, smaller ones where those would not fit (fp32, less shared memory)."""
    pytest.importorskip('triton')
    from lmdeploy.turbomind.kernels import triton_prompt_attention as tpr
    h100 = 232448
    assert tpr.tiles(torch.float16, 128, h100) == tpr.CFG
    assert tpr.tiles(torch.bfloat16, 128, h100) == tpr.CFG
    for dtype, D, limit in ((torch.float32, 128, h100), (torch.float16, 128, 166912),
                            (torch.float32, 256, 101376)):
        c = tpr.tiles(dtype, D, limit)
        size = torch.empty(0, dtype=dtype).element_size()
        assert (c['num_stages'] * 2 * c['BLOCK_N'] + c['BLOCK_M']) * D * size <= limit, c
        assert c['BLOCK_N'] >= 16 and c['BLOCK_M'] >= 16
