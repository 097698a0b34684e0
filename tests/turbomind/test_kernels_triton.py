"""Triton kernels vs their torch references, on CPU through Triton's interpreter.

The interpreter must be switched on (TRITON_INTERPRET=1) before any Triton kernel is defined,
so the checks run in ONE subprocess (this file run as a script) and the parametrised tests
below read its per-case verdicts: other test modules keep the normal (compiled) Triton state.
Shapes are small: the interpreter runs every program in numpy. It computes bf16 ``tl.dot``
wrongly, so attention is checked in fp32 and fp16 only; the element-wise kernels in bf16 too
(with tolerances: the interpreter rounds fp32 -> bf16 by truncation, the GPU to nearest).

    PYTHONPATH=. TRITON_INTERPRET=1 python tests/turbomind/test_kernels_triton.py [case ...]
"""
import importlib
import sys
import zlib

import pytest

from tests.turbomind.interpreter_cases import case_tests, run_cases


# name -> parameters; pure data so pytest can collect without importing triton.
# attention rows: (num_cached, q_len); q_len 1 rows first are decode rows.
CASES = {}


def _case(name, **kw):
    CASES[name] = kw


for dt in ('float32', 'float16', 'bfloat16'):
    _case(f'rms_norm-{dt}', op='rms_norm', T=5, H=48, dtype=dt)
    _case(f'rms_norm-res-{dt}', op='rms_norm', T=5, H=100, dtype=dt, residual=True)
    _case(f'silu_and_mul-{dt}', op='silu_and_mul', T=4, I=40, dtype=dt)
    _case(f'rotary-{dt}', op='rotary', T=6, hq=4, hkv=2, D=32, rotary_dim=32, theta=1e4,
          dtype=dt)
    _case(f'store_kv-{dt}', op='store_kv', T=7, hkv=2, D=32, page=4, dtype=dt)
_case('rms_norm-wide', op='rms_norm', T=3, H=4096, dtype='float32', residual=True)
_case('silu_and_mul-multiblock', op='silu_and_mul', T=2, I=2500, dtype='float32')
_case('rotary-partial-gqa4', op='rotary', T=5, hq=8, hkv=2, D=24, rotary_dim=16, theta=5e5,
      dtype='float32')
_case('rotary-d128-strided', op='rotary', T=3, hq=4, hkv=4, D=128, rotary_dim=128, theta=1e4,
      dtype='float32', fused=True)
_case('store_kv-strided-page16', op='store_kv', T=9, hkv=4, D=16, page=16, dtype='float32',
      fused=True)
_case('store_kv-d128', op='store_kv', T=4, hkv=1, D=128, page=16, dtype='float16')

for D, hq, hkv, page in ((16, 4, 4, 4), (32, 4, 2, 16), (128, 4, 1, 16), (32, 8, 2, 4)):
    g = hq // hkv
    _case(f'attn-decode-D{D}-g{g}-p{page}', op='attn', D=D, hq=hq, hkv=hkv, page=page,
          rows=[(0, 1), (6, 1), (37, 1)], dtype='float32')
    _case(f'attn-mixed-D{D}-g{g}-p{page}', op='attn', D=D, hq=hq, hkv=hkv, page=page,
          rows=[(10, 1), (33, 1), (0, 7), (5, 6), (13, 20)], dtype='float32')
_case('attn-decode-split3', op='attn', D=32, hq=4, hkv=2, page=4, rows=[(40, 1), (3, 1), (70, 1)],
      dtype='float32', num_splits=3)
_case('attn-decode-split-auto-long', op='attn', D=16, hq=2, hkv=1, page=16,
      rows=[(300, 1), (17, 1)], dtype='float32')
# more partitions than the combine kernel merges per iteration (COMBINE_CHUNK 16): 38
# partitions of 8 tokens, 3 chunks for the long row, 1 for the short ones; and mixed
_case('attn-decode-split38', op='attn', D=16, hq=2, hkv=1, page=4,
      rows=[(300, 1), (5, 1), (70, 1)], dtype='float32', num_splits=40,
      decode_cfg=dict(BLOCK_N=8))
_case('attn-mixed-split38', op='attn', D=16, hq=4, hkv=2, page=4,
      rows=[(300, 1), (0, 9), (133, 1)], dtype='float32', num_splits=40,
      decode_cfg=dict(BLOCK_N=8))
_case('attn-decode-nodot', op='attn', D=32, hq=4, hkv=1, page=4, rows=[(9, 1), (50, 1)],
      dtype='float32', num_splits=2, decode_cfg=dict(use_dot=False, BLOCK_N=16))
_case('attn-decode-blockn-lt-page', op='attn', D=16, hq=2, hkv=2, page=16,
      rows=[(40, 1), (1, 1)], dtype='float32', decode_cfg=dict(BLOCK_N=8))
_case('attn-prefill-only', op='attn', D=32, hq=4, hkv=2, page=16, rows=[(0, 37)],
      dtype='float32')
_case('attn-prefill-prefix-unaligned', op='attn', D=32, hq=4, hkv=4, page=16,
      rows=[(19, 23), (3, 2)], dtype='float32', prefill_cfg=dict(BLOCK_M=16, BLOCK_N=16))
_case('attn-prefill-g8', op='attn', D=16, hq=8, hkv=1, page=4, rows=[(2, 1), (5, 9)],
      dtype='float32')
_case('attn-mixed-split3-unordered', op='attn', D=32, hq=4, hkv=2, page=4,
      rows=[(0, 5), (40, 1), (9, 3), (0, 1), (70, 1)], dtype='float32', num_splits=3)
_case('attn-decode-fp16', op='attn', D=32, hq=4, hkv=2, page=16, rows=[(20, 1), (45, 1)],
      dtype='float16', num_splits=2)
_case('attn-mixed-fp16', op='attn', D=32, hq=4, hkv=2, page=4, rows=[(20, 1), (7, 12)],
      dtype='float16')

# int8 KV (kv_quant.py): 'static' (per-head scale + zero-point) and 'online' (per-token scales)
for quant in ('static', 'online'):
    for dt in ('float32', 'float16', 'bfloat16'):
        _case(f'store_kv-int8-{quant}-{dt}', op='store_kv', T=7, hkv=3, D=24, page=4, dtype=dt,
              quant=quant)
    _case(f'store_kv-int8-{quant}-strided-d128', op='store_kv', T=5, hkv=2, D=128, page=16,
          dtype='float16', fused=True, quant=quant)
    _case(f'attn-int8-{quant}-decode-split3', op='attn', D=32, hq=4, hkv=2, page=4,
          rows=[(40, 1), (3, 1), (70, 1)], dtype='float32', num_splits=3, quant=quant)
    _case(f'attn-int8-{quant}-mixed-g4', op='attn', D=16, hq=8, hkv=2, page=16,
          rows=[(10, 1), (33, 1), (0, 7), (5, 6), (13, 20)], dtype='float32', quant=quant)
    _case(f'attn-int8-{quant}-prefill-unaligned', op='attn', D=32, hq=4, hkv=4, page=16,
          rows=[(19, 23), (3, 2)], dtype='float32', quant=quant,
          prefill_cfg=dict(BLOCK_M=16, BLOCK_N=16))
    _case(f'attn-int8-{quant}-decode-nodot', op='attn', D=32, hq=4, hkv=1, page=4,
          rows=[(9, 1), (50, 1)], dtype='float32', num_splits=2, quant=quant,
          decode_cfg=dict(use_dot=False, BLOCK_N=16))
    _case(f'attn-int8-{quant}-mixed-fp16', op='attn', D=32, hq=4, hkv=2, page=4,
          rows=[(20, 1), (45, 1), (7, 12)], dtype='float16', quant=quant)
    # int8 -> fp16 by bits (_load_kv's FAST_I8): the same values as the cast
    _case(f'attn-int8-{quant}-decode-fp16-fast-i8', op='attn', D=32, hq=4, hkv=2, page=4,
          rows=[(20, 1), (45, 1), (70, 1)], dtype='float16', quant=quant, num_splits=2,
          decode_cfg=dict(fast_i8=True))

# rotary + store_kv in one kernel: equal (bitwise) to the two Triton kernels, close to the refs.
# q/k/v are column views of a fused qkv output; slot 1 is negative.
for dt in ('float32', 'float16', 'bfloat16'):
    _case(f'rotary_store_kv-{dt}', op='rotary_store_kv', T=7, hq=4, hkv=2, D=32, rotary_dim=32,
          theta=1e4, page=4, dtype=dt)
    for quant in ('static', 'online'):
        _case(f'rotary_store_kv-int8-{quant}-{dt}', op='rotary_store_kv', T=7, hq=4, hkv=2, D=32,
              rotary_dim=32, theta=1e4, page=4, dtype=dt, quant=quant)
_case('rotary_store_kv-fp16-fp32cache', op='rotary_store_kv', T=5, hq=2, hkv=2, D=16,
      rotary_dim=16, theta=1e4, page=4, dtype='float16', cache_dtype='float32')
_case('rotary_store_kv-partial-gqa4', op='rotary_store_kv', T=5, hq=8, hkv=2, D=24,
      rotary_dim=16, theta=5e5, page=16, dtype='float32')
_case('rotary_store_kv-partial-int8-online', op='rotary_store_kv', T=5, hq=8, hkv=2, D=24,
      rotary_dim=16, theta=5e5, page=16, dtype='float16', quant='online')
_case('rotary_store_kv-headblocks', op='rotary_store_kv', T=4, hq=6, hkv=3, D=16,
      rotary_dim=12, theta=1e4, page=4, dtype='float16', quant='online',
      cfg=dict(BLOCK_HQ=4, BLOCK_HKV=2, num_warps=1))
_case('rotary_store_kv-norotary', op='rotary_store_kv', T=4, hq=2, hkv=1, D=16, rotary_dim=0,
      theta=1e4, page=4, dtype='float16')
_case('rotary_store_kv-d128-page16', op='rotary_store_kv', T=3, hq=4, hkv=1, D=128,
      rotary_dim=128, theta=1e4, page=16, dtype='bfloat16', quant='static')

# one fresh prompt's dense causal attention: q, k, v are column views of a fused qkv output;
# small tiles so a prompt spans several query and KV tiles, ragged at the end
for T, hq, hkv, D, dt, bm, bn in ((1, 4, 4, 32, 'float32', 16, 16),
                                  (37, 4, 1, 64, 'float32', 16, 16),
                                  (70, 8, 2, 24, 'float32', 16, 32),
                                  (64, 2, 2, 32, 'float16', 32, 16),
                                  (130, 2, 2, 64, 'float16', 32, 32)):
    _case(f'prompt_attention-T{T}-g{hq // hkv}-D{D}-{dt}', op='prompt_attention', T=T, hq=hq,
          hkv=hkv, D=D, dtype=dt, cfg=dict(BLOCK_M=bm, BLOCK_N=bn))

# the sampler's last step: the same token ids as the reference (V 3000 and 4500: two and three
# chunks of 2048, the last one ragged); modes: argmax, argmax with bad words, draws with and
# without temperature / greedy rows
for V in (50, 3000, 4500):
    for mode in ('argmax', 'banned', 'draw', 'draw-plain'):
        _case(f'sample-V{V}-{mode}', op='sample', S=7, V=V, mode=mode, dtype='float32')
_case('sample-fp16-logits', op='sample', S=5, V=300, mode='draw', dtype='float16')


# ----------------------------------------------------------------------------- the checks
def _rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _tol(dtype_name):
    return {'float32': 1e-5, 'float16': 2e-3, 'bfloat16': 1.5e-2}[dtype_name]


def _int8_qparams(quant, hkv, nb, page, g):
    """Random static (scale, zp) rows [4, hkv] or a zeroed online scale pool."""
    import torch
    if quant == 'static':
        scale = 0.01 + 0.04 * torch.rand(2, hkv, generator=g)
        zp = 0.2 * torch.randn(2, hkv, generator=g)
        return torch.stack([scale[0], zp[0], scale[1], zp[1]])
    return torch.zeros(2, nb, hkv, page)


def _same_bits(a, b):
    import torch
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and torch.equal(a.view(ints[a.element_size()]),
                                              b.view(ints[b.element_size()]))


def _check_rotary_store_kv(K, p, rnd, g):
    """Fused kernel vs (rotary_embedding_triton; store_kv_triton): identical q, pools and online
    scales; k and v in the qkv buffer untouched. Returns (ok, rel err vs the reference)."""
    import torch
    T, hq, hkv, D, page, rd, theta = (p[n] for n in ('T', 'hq', 'hkv', 'D', 'page',
                                                      'rotary_dim', 'theta'))
    nb = 8
    qkv = rnd(T, (hq + 2 * hkv) * D)
    if 0 < rd < D:  # a pass-through pair (-0, -1) must keep its -0 (not become 0 * cos ...)
        qkv.view(T, -1, D)[..., rd:rd + 2] = torch.tensor([-0.0, -1.0], dtype=qkv.dtype)
    pos = torch.randint(0, 5000, (T,), generator=g)
    slots = torch.randperm(nb * page, generator=g)[:T]
    slots[1] = -1
    quant = p.get('quant')
    if quant:
        kc = torch.randint(-128, 128, (nb, page, hkv, D), generator=g, dtype=torch.int8)
        vc, qp = kc.flip(0), _int8_qparams(quant, hkv, nb, page, g)
    else:
        cdt = getattr(torch, p.get('cache_dtype', p['dtype']))
        kc, vc, qp = rnd(nb, page, hkv, D).to(cdt), rnd(nb, page, hkv, D).to(cdt), None

    def run(fn):
        buf = qkv.clone()
        q, k, v = (x.view(T, -1, D) for x in buf.split([hq * D, hkv * D, hkv * D], dim=-1))
        kc2, vc2 = kc.clone(), vc.clone()
        qp2 = None if qp is None else qp.clone()
        oq = fn(q, k, v, kc2, vc2, qp2)
        return buf, oq, kc2, vc2, qp2

    def separate(q, k, v, kc2, vc2, qp2):
        q, k = K.rotary_embedding_triton(q, k, pos, rd, theta)
        K.store_kv_triton(k, v, kc2, vc2, slots, qp2)
        return q

    ref = run(lambda q, k, v, *c: K.rotary_store_kv_ref(q, k, v, pos, rd, theta, *c[:2],
                                                        slots, c[2]))
    sep = run(separate)
    fused = run(lambda q, k, v, *c: K.rotary_store_kv_triton(q, k, v, pos, rd, theta, *c[:2],
                                                             slots, c[2], cfg=p.get('cfg')))
    buf, oq = fused[:2]
    ok = oq.data_ptr() == buf.data_ptr()  # q rotated in place in the qkv buffer
    ok = ok and torch.equal(buf[:, hq * D:], qkv[:, hq * D:])  # k, v not written
    ok = ok and all(_same_bits(a, b) for a, b in zip(fused[1:], sep[1:]) if a is not None)
    if quant:  # the written rows use the int8 range
        ok = ok and int(fused[2].view(-1, hkv, D)[slots[slots >= 0]].abs().max()) >= 50
    err = max(_rel_err(a.float(), b.float()) for a, b in zip(fused[1:], ref[1:])
              if a is not None)
    return ok, err


def run_case(name):
    """Returns (ok, message). Runs in the interpreter subprocess."""
    import torch

    from lmdeploy.turbomind.kernels import (activation, paged_attention, prompt_attention,
                                            rms_norm, rotary, rotary_store_kv, sample, store_kv)
    from lmdeploy.turbomind.step_input import RowPlan, build_step_input
    from tests.turbomind.draw_oracle import valid_draws

    class K:  # every op's reference and Triton kernel
        pass
    for mod in (activation, paged_attention, prompt_attention, rms_norm, rotary,
                rotary_store_kv, sample, store_kv):
        for attr in dir(mod):
            if attr.endswith(('_ref', '_triton')):
                setattr(K, attr, getattr(mod, attr))

    p = CASES[name]
    dtype = getattr(torch, p['dtype'])
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same data every run

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    op = p['op']
    if op == 'rms_norm':
        x, w = rnd(p['T'], p['H']), (1 + 0.1 * torch.randn(p['H'], generator=g)).to(dtype)
        if p.get('residual'):
            r = rnd(p['T'], p['H'])
            o, nr = K.rms_norm_triton(x, w, 1e-6, r)
            ro, rnr = K.rms_norm_ref(x, w, 1e-6, r)
            err = max(_rel_err(o, ro), _rel_err(nr, rnr))
            # the interpreter casts fp32 -> bf16 by truncation (the GPU rounds), so the new
            # residual is bit-exact only for fp32/fp16 here
            ok = o.dtype == ro.dtype and (dtype == torch.bfloat16 or torch.equal(nr, rnr))
        else:
            o, ro = K.rms_norm_triton(x, w, 1e-6), K.rms_norm_ref(x, w, 1e-6)
            err, ok = _rel_err(o, ro), o.dtype == ro.dtype
    elif op == 'silu_and_mul':
        x = rnd(p['T'], 2 * p['I'], scale=3.0)
        o, ro = K.silu_and_mul_triton(x), K.silu_and_mul_ref(x)
        err, ok = _rel_err(o, ro), o.shape == ro.shape
    elif op == 'rotary':
        T, hq, hkv, D = p['T'], p['hq'], p['hkv'], p['D']
        pos = torch.randint(0, 5000, (T,), generator=g)
        if p.get('fused'):  # q, k as column slices of a fused qkv output
            qkv = rnd(T, (hq + 2 * hkv) * D)
            q, k, _ = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
            q, k = q.reshape(T, hq, D), k.reshape(T, hkv, D)
        else:
            q, k = rnd(T, hq, D), rnd(T, hkv, D)
        rq, rk = K.rotary_embedding_ref(q.clone(), k.clone(), pos, p['rotary_dim'], p['theta'])
        q_ptr = q.data_ptr()
        oq, ok_ = K.rotary_embedding_triton(q, k, pos, p['rotary_dim'], p['theta'])
        err = max(_rel_err(oq, rq), _rel_err(ok_, rk))
        ok = oq.data_ptr() == q_ptr
    elif op == 'store_kv':
        T, hkv, D, page = p['T'], p['hkv'], p['D'], p['page']
        nb = 8
        if p.get('fused'):
            kv = rnd(T, 3 * hkv * D)
            k, v = kv[:, hkv * D:2 * hkv * D].view(T, hkv, D), kv[:, 2 * hkv * D:].view(T, hkv, D)
        else:
            k, v = rnd(T, hkv, D), rnd(T, hkv, D)
        slots = torch.randperm(nb * page, generator=g)[:T]
        slots[1] = -1
        quant = p.get('quant')
        if quant:  # int8 caches; the integers (and online scales) must be identical
            kc = torch.randint(-128, 128, (nb, page, hkv, D), generator=g, dtype=torch.int8)
            vc = kc.flip(0)
            qp = _int8_qparams(quant, hkv, nb, page, g)
            qp2 = qp.clone()
        else:
            kc, vc = rnd(nb, page, hkv, D), rnd(nb, page, hkv, D)
            qp = qp2 = None
        kc2, vc2 = kc.clone(), vc.clone()
        K.store_kv_ref(k, v, kc, vc, slots, qp)
        K.store_kv_triton(k, v, kc2, vc2, slots, qp2)
        ok = torch.equal(kc, kc2) and torch.equal(vc, vc2)
        if quant:
            ok = ok and torch.equal(qp, qp2) and int(kc.abs().max()) >= 100  # range is used
        err = 0.0 if ok else 1.0
    elif op == 'rotary_store_kv':
        ok, err = _check_rotary_store_kv(K, p, rnd, g)
    elif op == 'prompt_attention':
        T, hq, hkv, D = p['T'], p['hq'], p['hkv'], p['D']
        qkv = rnd(T, (hq + 2 * hkv) * D)
        q, k, v = (x.view(T, -1, D) for x in qkv.split([hq * D, hkv * D, hkv * D], dim=-1))
        o = K.prompt_attention_triton(q, k, v, D ** -0.5, cfg=p['cfg'])
        err = _rel_err(o, K.prompt_attention_ref(q, k, v, D ** -0.5))
        ok = o.dtype == dtype and bool(torch.isfinite(o).all())
    elif op == 'sample':
        S, V, mode = p['S'], p['V'], p['mode']
        x = rnd(S, V, scale=2.0)
        x[0, 5] = x[0, V - 1] = x[0].max() + 1  # a tie: the first index wins
        bad = torch.randint(-1, V, (S, 3), generator=g)
        bad[1, 0] = int(x[1].argmax())  # a banned argmax
        bad[2, 1] = V + 7  # out of range: ignored
        temp = 0.3 + 1.5 * torch.rand(S, generator=g)
        temp[3] = 0.0
        greedy = temp == 0
        keys = torch.randint(-2 ** 63, 2 ** 63 - 1, (S,), generator=g)  # any int64 bits
        counters = torch.randint(0, 2 ** 40, (S,), generator=g)
        args = {'argmax': (x,), 'banned': (x, bad),
                'draw': (x, bad, temp, greedy, keys, counters),
                'draw-plain': (x, None, None, None, keys, counters)}[mode]
        got, want = K.sample_tokens_triton(*args), K.sample_tokens_ref(*args)
        wrong = got != want
        if mode.startswith('draw'):  # fp32 sums in another order: a draw at a boundary may move
            wrong &= ~valid_draws(*args, got)
        ok = got.dtype == torch.int64 and not bool(wrong.any())
        if mode in ('banned', 'draw'):
            ok = ok and int(got[1]) != int(bad[1, 0])
        err = float(wrong.sum())
    elif op == 'attn':
        D, hq, hkv, page = p['D'], p['hq'], p['hkv'], p['page']
        rows = p['rows']
        need = [-(-(c + n) // page) for c, n in rows]
        nb = sum(need) + 3
        perm = torch.randperm(nb, generator=g).tolist()
        plans, i = [], 0
        for (c, n), nblk in zip(rows, need):
            plans.append(RowPlan(tokens=[1] * n, num_cached=c, block_ids=perm[i:i + nblk]))
            i += nblk
        step = build_step_input(plans, page)
        T = step.num_tokens
        q = rnd(T, hq, D)
        kc, vc = rnd(nb, page, hkv, D), rnd(nb, page, hkv, D)
        qp = None
        if p.get('quant'):  # int8 caches quantised from the random K/V by the reference
            qp = _int8_qparams(p['quant'], hkv, nb, page, g)
            kf, vf = kc.view(-1, hkv, D) * 2 + 0.3, vc.view(-1, hkv, D)
            kc = torch.empty(kc.shape, dtype=torch.int8)
            vc = torch.empty(vc.shape, dtype=torch.int8)
            K.store_kv_ref(kf, vf, kc, vc, torch.arange(nb * page), qp)
        scale = D ** -0.5
        args = (q, kc, vc, step.block_table, step.cu_seqlens, step.kv_lens, scale,
                step.max_q_len, step.max_kv_len)
        ro = K.paged_attention_ref(*args, qp)
        o = K.paged_attention_triton(*args, qp, num_splits=p.get('num_splits'),
                                   decode_cfg=p.get('decode_cfg'),
                                   prefill_cfg=p.get('prefill_cfg'))
        err = _rel_err(o, ro)
        ok = bool(torch.isfinite(o).all())
        # same result without the hints (the kernels derive bounds from shapes)
        o2 = K.paged_attention_triton(*args[:7], kv_qparams=qp, num_splits=p.get('num_splits'),
                                    decode_cfg=p.get('decode_cfg'),
                                    prefill_cfg=p.get('prefill_cfg'))
        err = max(err, _rel_err(o2, ro))
    else:
        raise ValueError(op)
    tol = _tol(p['dtype'])
    ok = bool(ok) and err <= tol
    return ok, f'rel_err={err:.2e} tol={tol:.0e}'


# the pytest side: every case in the interpreter (one subprocess), one test per case
interp_results, test_triton_kernel_matches_reference = case_tests(__file__, CASES)


def test_every_op_exports_a_device_kernel():
    """Every op has a Triton kernel, or a CUDA library one (`<op>_cuda`)."""
    pytest.importorskip('triton')
    from lmdeploy.turbomind import kernels
    for op, module in kernels.OPS.items():
        mod = importlib.import_module(f'lmdeploy.turbomind.kernels.{module}')
        fn = getattr(mod, f'{op}_triton', None) or getattr(mod, f'{op}_cuda', None)
        assert callable(fn), f'{module}.py lacks {op}_triton / {op}_cuda'


if __name__ == '__main__':
    run_cases(run_case, sys.argv[1:] or list(CASES))
