"""Time the data-plane kernels (Triton vs torch reference) on a CUDA GPU; print a table, write JSON.

    python3 benchmark/bench_kernels.py [--out kernels.json] [--sweep] [--quick]
                                       [--only int8|rotary_store_kv]

Decode attention is the headline: batch 64, context 4096, Llama-2-7B heads (32 x 128, MHA)
and Llama-3-8B's GQA (8 KV heads), block 64, fp16. Its bandwidth is bytes of KV read / time
(the BENCHMARKS.md kernel goal is >= 80% of the ~3.0 TB/s the H100 copies at). Element-wise
kernels report (bytes read + written) / time. Times are medians of triton.testing.do_bench
(CUDA events; 'eager' includes the Python launch) and, for the Triton kernels, of CUDA-graph
replays (device time only, as the engine's decode graphs will see it). `--sweep` also times
the decode kernel's tunables and prints the best. int8 KV rows (quant_policy 4, static
per-head scales and online per-token scales) count the int8 bytes (plus the online scales);
`--only int8` runs them beside the fp16 decode rows they compare with. `rotary+store_kv`
rows time the fused kernel against the rotary + store_kv pair it replaces in the layer
(`--only rotary_store_kv` runs just those, `--sweep` adds its head-block sizes). `--only
prefill`: prompt attention at 2048 tokens (Triton paged vs torch SDPA backends), then the
wall time of single dense-prompt calls at lengths met for the first time vs again (what a new
prompt length costs in setup, e.g. a cuDNN plan).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from lmdeploy.turbomind.kernels import triton_paged_attention as tpa  # noqa: E402
from lmdeploy.turbomind.kernels.activation import (silu_and_mul_ref,  # noqa: E402
                                                   silu_and_mul_triton)
from lmdeploy.turbomind.kernels.paged_attention import paged_attention_ref  # noqa: E402
from lmdeploy.turbomind.kernels.rms_norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from lmdeploy.turbomind.kernels.rotary import (rotary_embedding_ref,  # noqa: E402
                                               rotary_embedding_triton)
from lmdeploy.turbomind.kernels.rotary_store_kv import rotary_store_kv_triton  # noqa: E402
from lmdeploy.turbomind.kernels.store_kv import store_kv_ref, store_kv_triton  # noqa: E402

DEV = 'cuda'
PEAK_TBS = 3.0  # measured H100 device-to-device copy (BENCHMARKS.md)
ROWS = []


def ms_eager(fn, rep=100):
    return do_bench(fn, warmup=25, rep=rep, return_mode='median')


def try_config(c, f, ref, timer):
    """One sweep candidate: (ms, c, relative error vs ref), or None (printed) if it fails."""
    try:
        o = f()
        e = float((o.double() - ref.double()).norm() / ref.double().norm())
        return timer(f, rep=50), c, e
    except Exception as ex:  # noqa: BLE001 - a config the compiler rejects is skipped
        print(f'  cfg {c}: failed {type(ex).__name__}: {str(ex)[:200]}')
        return None


def sweep_best(kernel, shape, cands, run, ref, timer, nbytes=None, flops=None):
    """Time `run(cfg)` for each candidate config against `ref`, print each, and record the
    fastest as 'triton-best'."""
    results = []
    for c in cands:
        r = try_config(c, lambda c=c: run(c), ref, timer)
        if r is None:
            continue
        results.append(r)
        rate = (f'{nbytes / r[0] / 1e9:.2f} TB/s' if nbytes else
                f'{flops / r[0] / 1e9:.1f} TFLOP/s')
        print(f'  cfg {c}: {r[0] * 1e3:.1f} us  {rate}  err {r[2]:.1e}', flush=True)
    if results:
        ms, c, e = min(results, key=lambda r: r[0])
        record(kernel, shape, 'triton-best', ms, nbytes=nbytes, flops=flops,
               graph_ms=ms if timer is ms_graph else None, cfg=c, rel_err=e)


def ms_graph(fn, rep=100):
    try:
        return do_bench_cudagraph(fn, rep=rep, return_mode='median')
    except Exception as e:  # noqa
        print(f'  (graph timing failed: {type(e).__name__}: {e})')
        return float('nan')


def record(kernel, shape, impl, ms, nbytes=None, flops=None, graph_ms=None, **extra):
    row = dict(kernel=kernel, shape=shape, impl=impl, ms=ms, graph_ms=graph_ms)
    t = graph_ms if graph_ms is not None and not math.isnan(graph_ms) else ms
    if nbytes is not None:
        row['GB'] = nbytes / 1e9
        row['TB/s'] = nbytes / t / 1e9
        row['%peak'] = 100 * row['TB/s'] / PEAK_TBS
    if flops is not None:
        row['TFLOP/s'] = flops / t / 1e9
    row.update(extra)
    ROWS.append(row)
    print(fmt_row(row), flush=True)
    return row


def fmt_row(r):
    def f(x, spec):
        return format(x, spec) if isinstance(x, (int, float)) and not math.isnan(x) else '-'
    return (f"{r['kernel']:<18} {r['shape']:<34} {r['impl']:<14} {f(r['ms'] * 1e3, '9.1f')} "
            f"{f((r.get('graph_ms') or float('nan')) * 1e3, '9.1f')} "
            f"{f(r.get('TB/s', float('nan')), '7.2f')} {f(r.get('%peak', float('nan')), '6.1f')} "
            f"{f(r.get('TFLOP/s', float('nan')), '7.1f')}")


HEADER = (f"{'kernel':<18} {'shape':<34} {'impl':<14} {'eager_us':>9} {'graph_us':>9} "
          f"{'TB/s':>7} {'%3.0':>6} {'TFLOP/s':>7}")


def copy_bandwidth():
    x = torch.empty(2 * 1024 ** 3 // 2, dtype=torch.float16, device=DEV).normal_()
    y = torch.empty_like(x)
    ms = ms_eager(lambda: y.copy_(x), rep=200)
    row = record('d2d_copy', '1 GiB', 'torch', ms, nbytes=2 * x.numel() * 2)
    del x, y
    return row


def make_attention(rows, hq, hkv, D, page, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // page) for c, n in rows]
    nb = sum(need)
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    width = max(need)
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    i = 0
    for b, k in enumerate(need):
        table[b, :k] = perm[i:i + k]
        i += k
    q_lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(q_lens, 0)
    kv_lens = torch.tensor([c + n for c, n in rows], dtype=torch.int32)
    T = int(cu[-1])
    q = torch.randn(T, hq, D, device=DEV, dtype=dtype)
    kc = torch.randn(nb, page, hkv, D, device=DEV, dtype=dtype)
    vc = torch.randn(nb, page, hkv, D, device=DEV, dtype=dtype)
    return (q, kc, vc, table.to(DEV), cu.to(DEV), kv_lens.to(DEV), D ** -0.5,
            int(q_lens.max()), int(kv_lens.max()))


def to_int8(args, quant):
    """The attention inputs with int8 caches (quantised by store_kv) and their kv_qparams:
    'static' (per-head scale 4/127) or 'online' (per-token scales)."""
    kc, vc = args[1], args[2]
    nb, page, hkv, D = kc.shape
    if quant == 'static':
        qp = torch.tensor([[4 / 127], [0.0], [4 / 127], [0.0]], device=DEV).repeat(1, hkv)
    else:
        qp = torch.zeros(2, nb, hkv, page, device=DEV)
    k8 = torch.empty(kc.shape, dtype=torch.int8, device=DEV)
    v8 = torch.empty_like(k8)
    store_kv_triton(kc.view(-1, hkv, D), vc.view(-1, hkv, D), k8, v8,
                    torch.arange(nb * page, device=DEV), qp)
    return (args[0], k8, v8, *args[3:]), qp


def bench_decode(B, ctx, hq, hkv, D=128, page=64, dtype=torch.float16, sweep=False,
                 with_ref=False, with_sdpa=False, quant=None, hint=0):
    """hint: the max_kv_len launch hint (0: the real context); the engine's CUDA graphs launch
    with session_len, so the split count does not see the real context."""
    args = make_attention([(ctx - 1, 1)] * B, hq, hkv, D, page, dtype)
    if hint:
        args = (*args[:8], hint)
    qp = None
    if quant:
        args, qp = to_int8(args, quant)
    kv_bytes = B * ctx * hkv * (D * 2 * args[1].element_size() + (8 if quant == 'online' else 0))
    shape = f'B{B} ctx{ctx} hq{hq} hkv{hkv} p{page}' + (f' int8-{quant}' if quant else '') + (
        f' hint{hint}' if hint else '')
    splits, part = tpa.decode_splits(B, hkv, hint or ctx, torch.device(DEV))
    fn = lambda: tpa.paged_attention_triton(*args, kv_qparams=qp)  # noqa: E731
    ref = paged_attention_ref(*args, kv_qparams=qp)
    err = float((fn().double() - ref.double()).norm() / ref.double().norm())
    best = record('decode_attn', shape, 'triton', ms_eager(fn), nbytes=kv_bytes,
                  graph_ms=ms_graph(fn), splits=splits, partition=part, rel_err=err)
    if sweep:
        cands = []
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 4):
                    cands.append(dict(BLOCK_N=bn, num_warps=warps, num_stages=stages))
        if quant:  # around INT8_DECODE_CFG (stages 6, fast_i8), which every candidate extends
            cands = [dict(fast_i8=False)]  # the int-to-float instruction, for comparison
            # int8 tiles are half the bytes: deeper pipelines keep as many in flight
            cands += [dict(BLOCK_N=bn, num_warps=w, num_stages=st) for bn, w, st in
                      ((64, 4, 5), (64, 4, 7), (32, 4, 8), (128, 4, 4), (64, 8, 6))]
            # an int8 program is done sooner: more, shorter partitions against the last
            # wave's tail (only where waves x SMs exceeds rows x KV heads)
            cands += [dict(waves=16), dict(waves=32), dict(waves=32, min_partition=512)]
        else:
            cands += [dict(BLOCK_N=64, num_warps=4, num_stages=1),
                      dict(BLOCK_N=32, num_warps=2, num_stages=2),
                      dict(BLOCK_N=16, num_warps=2, num_stages=2),
                      dict(use_dot=False, BLOCK_N=32, num_warps=4, num_stages=2),
                      dict(use_dot=False, BLOCK_N=64, num_warps=4, num_stages=3),
                      dict(waves=8), dict(waves=1),
                      # shorter partitions: more programs for one row's long context
                      dict(min_partition=128), dict(min_partition=64),
                      dict(min_partition=128, waves=8), dict(min_partition=128, num_stages=2),
                      # a graph's hint is session_len: only more waves shorten the partition
                      dict(min_partition=64, waves=16), dict(min_partition=64, waves=16,
                                                              num_stages=2),
                      dict(waves=32), dict(waves=64), dict(min_partition=64, waves=32)]
        sweep_best('decode_attn', shape, cands,
                   lambda c: tpa.paged_attention_triton(*args, kv_qparams=qp, decode_cfg=c),
                   ref, ms_graph, nbytes=kv_bytes)
    if with_sdpa and not quant:  # anchor: torch SDPA over the same KV stored dense (no paging)
        k = args[1].view(-1, hkv, D)[:B * ctx].view(B, ctx, hkv, D).transpose(1, 2)
        v = args[2].view(-1, hkv, D)[:B * ctx].view(B, ctx, hkv, D).transpose(1, 2)
        k, v = k.contiguous(), v.contiguous()
        qd = args[0].view(B, hq, 1, D)
        f = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qd, k, v, enable_gqa=hq != hkv)
        try:
            record('decode_attn', shape, 'torch-sdpa', ms_eager(f), nbytes=kv_bytes,
                   graph_ms=ms_graph(f))
        except Exception as ex:  # noqa
            print(f'  sdpa failed: {ex}')
        del k, v
    if with_ref:
        record('decode_attn', shape, 'ref', ms_eager(lambda: paged_attention_ref(*args), rep=20),
               nbytes=kv_bytes)
    del args, ref
    torch.cuda.empty_cache()
    return best


def bench_prefill(rows, hq, hkv, D=128, page=64, dtype=torch.float16, name='', with_sdpa=False,
                  sweep=False):
    args = make_attention(rows, hq, hkv, D, page, dtype, seed=1)
    flops = 0
    for c, n in rows:  # QK^T and PV over each token's visible KV
        flops += 4 * hq * D * sum(c + i + 1 for i in range(n))
    fn = lambda: tpa.paged_attention_triton(*args)  # noqa: E731
    ref = paged_attention_ref(*args)
    err = float((fn().double() - ref.double()).norm() / ref.double().norm())
    record('prefill_attn', name, 'triton', ms_eager(fn), flops=flops, graph_ms=ms_graph(fn),
           rel_err=err)
    record('prefill_attn', name, 'ref', ms_eager(lambda: paged_attention_ref(*args), rep=20),
           flops=flops)
    if sweep:
        cands = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=3)
                 for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)]
        sweep_best('prefill_attn', name, cands,
                   lambda c: tpa.paged_attention_triton(*args, prefill_cfg=c), ref, ms_eager,
                   flops=flops)
    if with_sdpa and len(rows) == 1 and rows[0][0] == 0:
        n = rows[0][1]
        qd = args[0].view(1, n, hq, D).transpose(1, 2)
        k = torch.randn(1, hkv, n, D, device=DEV, dtype=dtype)
        v = torch.randn_like(k)
        f = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qd, k, v, is_causal=True, enable_gqa=hq != hkv)
        record('prefill_attn', name, 'torch-sdpa', ms_eager(f), flops=flops)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            def g(backend=backend):
                with sdpa_kernel(backend):
                    return f()
            try:
                record('prefill_attn', name, f'sdpa-{backend.name.lower()}', ms_eager(g),
                       flops=flops)
            except Exception as ex:  # noqa: BLE001 - a backend this build lacks
                print(f'  sdpa {backend.name}: {str(ex).splitlines()[0][:100]}')
    del args
    torch.cuda.empty_cache()


def bench_prompt_first_calls(lengths=(2048, 600, 601, 777, 1000, 2048, 600), hq=32, hkv=32,
                             D=128, dtype=torch.float16):
    """The engine's dense prompt attention (prompt_attention_cuda: torch SDPA, cuDNN on the
    H100) on prompt lengths in the order given: the wall time of each call, synchronized, so
    a length met for the first time shows what its setup costs (a cuDNN plan is built per
    shape) against a length met before."""
    from lmdeploy.turbomind.kernels.prompt_attention import prompt_attention_cuda
    seen = set()
    for n in lengths:
        q = torch.randn(n, hq, D, device=DEV, dtype=dtype)
        k = torch.randn(n, hkv, D, device=DEV, dtype=dtype)
        v = torch.randn(n, hkv, D, device=DEV, dtype=dtype)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prompt_attention_cuda(q, k, v, D ** -0.5)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        record('prompt_attn_call', f'T{n} hq{hq} hkv{hkv}',
               'first' if n not in seen else 'again', ms)
        seen.add(n)


def bench_dense_prompt(T, hq, hkv, D=128, dtype=torch.float16, sweep=False):
    """One fresh prompt's causal attention, the engine's dense path: torch SDPA (cuDNN on the
    H100, with the small kernels torch adds around it) against the Triton kernel
    (triton_prompt_attention.py), device time from CUDA graphs; `sweep` tries its tiles."""
    from lmdeploy.turbomind.kernels import triton_prompt_attention as tpr
    from lmdeploy.turbomind.kernels.prompt_attention import prompt_attention_cuda
    q = torch.randn(T, hq, D, device=DEV, dtype=dtype)
    k = torch.randn(T, hkv, D, device=DEV, dtype=dtype)
    v = torch.randn(T, hkv, D, device=DEV, dtype=dtype)
    scale = D ** -0.5
    flops = 4 * hq * D * T * (T + 1) // 2
    name = f'T{T} hq{hq} hkv{hkv}'
    ref = prompt_attention_cuda(q, k, v, scale)
    f = lambda: prompt_attention_cuda(q, k, v, scale)  # noqa: E731
    record('dense_prompt', name, 'cudnn-sdpa', ms_eager(f), flops=flops, graph_ms=ms_graph(f))
    f = lambda: tpr.prompt_attention_triton(q, k, v, scale, cfg=tpr.CFG)  # noqa: E731
    err = float((f().double() - ref.double()).norm() / ref.double().norm())
    record('dense_prompt', name, 'triton', ms_eager(f), flops=flops, graph_ms=ms_graph(f),
           rel_err=err, cfg=dict(tpr.CFG))
    if sweep:
        cands = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                 for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
        sweep_best('dense_prompt', name, cands,
                   lambda c: tpr.prompt_attention_triton(q, k, v, scale, cfg=c), ref, ms_graph,
                   flops=flops)


def bench_elementwise(T, dtype=torch.float16):
    H, inter, hq, hkv, D, page = 4096, 11008, 32, 32, 128, 64
    es = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(T, H, device=DEV, dtype=dtype)
    r = torch.randn(T, H, device=DEV, dtype=dtype)
    w = torch.randn(H, device=DEV, dtype=dtype)
    nb = 4 * T * H * es
    for impl, f in (('triton', lambda: rms_norm_triton(x, w, 1e-5, r)),
                    ('ref', lambda: rms_norm_ref(x, w, 1e-5, r))):
        record('rms_norm+res', f'T{T} H{H}', impl, ms_eager(f), nbytes=nb,
               graph_ms=ms_graph(f) if impl == 'triton' else None)
    gu = torch.randn(T, 2 * inter, device=DEV, dtype=dtype)
    nb = 3 * T * inter * es
    for impl, f in (('triton', lambda: silu_and_mul_triton(gu)),
                    ('ref', lambda: silu_and_mul_ref(gu))):
        record('silu_and_mul', f'T{T} I{inter}', impl, ms_eager(f), nbytes=nb,
               graph_ms=ms_graph(f) if impl == 'triton' else None)
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV, dtype=dtype)
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    q, k, v = q.view(T, hq, D), k.view(T, hkv, D), v.view(T, hkv, D)
    pos = torch.randint(0, 4096, (T,), device=DEV)
    nb = 2 * T * (hq + hkv) * D * es
    for impl, f in (('triton', lambda: rotary_embedding_triton(q, k, pos, D, 1e4)),
                    ('ref', lambda: rotary_embedding_ref(q, k, pos, D, 1e4))):
        record('rotary', f'T{T} hq{hq} hkv{hkv}', impl, ms_eager(f), nbytes=nb,
               graph_ms=ms_graph(f) if impl == 'triton' else None)
    nblk = triton.cdiv(T, page) * 4
    kc = torch.randn(nblk, page, hkv, D, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    slots = torch.randperm(nblk * page, device=DEV)[:T]
    nb = 2 * 2 * T * hkv * D * es
    for impl, f in (('triton', lambda: store_kv_triton(k, v, kc, vc, slots)),
                    ('ref', lambda: store_kv_ref(k, v, kc, vc, slots))):
        record('store_kv', f'T{T} hkv{hkv} p{page}', impl, ms_eager(f), nbytes=nb,
               graph_ms=ms_graph(f) if impl == 'triton' else None)


def bench_rotary_store_kv(T, hq=32, hkv=32, D=128, page=64, dtype=torch.float16, sweep=False):
    """The fused rotary + KV store against the two kernels it replaces (one graph each), on
    column views of a fused qkv output. Both rows count the fused kernel's bytes (q read and
    written, k and v read and written once), so TB/s compares like with like."""
    qkv = torch.randn(T, (hq + 2 * hkv) * D, device=DEV, dtype=dtype)
    q, k, v = (x.view(T, -1, D) for x in qkv.split([hq * D, hkv * D, hkv * D], dim=-1))
    pos = torch.randint(0, 4096, (T,), device=DEV)
    nblk = triton.cdiv(T, page) * 4
    kc = torch.randn(nblk, page, hkv, D, device=DEV, dtype=dtype)
    vc = torch.randn_like(kc)
    slots = torch.randperm(nblk * page, device=DEV)[:T]
    nb = 2 * T * (hq + 2 * hkv) * D * qkv.element_size()
    shape = f'T{T} hq{hq} hkv{hkv} p{page}'

    def separate():
        rotary_embedding_triton(q, k, pos, D, 1e4)
        store_kv_triton(k, v, kc, vc, slots)

    def fused(cfg=None):
        rotary_store_kv_triton(q, k, v, pos, D, 1e4, kc, vc, slots, cfg=cfg)

    for impl, f in (('fused', fused), ('separate', separate)):
        record('rotary+store_kv', shape, impl, ms_eager(f), nbytes=nb, graph_ms=ms_graph(f))
    if sweep:
        for bh, warps in ((32, 4), (32, 8), (16, 2), (16, 4), (8, 1), (8, 2), (4, 1)):
            c = dict(BLOCK_HQ=bh, BLOCK_HKV=bh, num_warps=warps)
            ms = ms_graph(lambda c=c: fused(c), rep=50)
            print(f'  cfg {c}: {ms * 1e3:.1f} us  {nb / ms / 1e9:.2f} TB/s', flush=True)


def bench_store_int8(T, quant):
    hkv, D, page = 32, 128, 64
    k = torch.randn(T, hkv, D, device=DEV, dtype=torch.float16)
    v = torch.randn_like(k)
    nblk = triton.cdiv(T, page) * 4
    (_, kc, vc, *_), qp = to_int8((None, torch.zeros(nblk, page, hkv, D, device=DEV),
                                   torch.zeros(nblk, page, hkv, D, device=DEV)), quant)
    slots = torch.randperm(nblk * page, device=DEV)[:T]
    nb = 2 * T * hkv * D * (2 + 1) + (2 * T * hkv * 4 if quant == 'online' else 0)
    f = lambda: store_kv_triton(k, v, kc, vc, slots, qp)  # noqa: E731
    record('store_kv', f'T{T} hkv{hkv} p{page} int8-{quant}', 'triton', ms_eager(f), nbytes=nb,
           graph_ms=ms_graph(f))


def bench_int8(sweep):
    """int8 KV rows beside the fp16 rows they compare with."""
    for hkv in (32, 8):
        bench_decode(64, 4096, 32, hkv)
        for quant in ('static', 'online'):
            bench_decode(64, 4096, 32, hkv, quant=quant,
                         sweep=sweep and hkv == 32 and quant == 'static')
    bench_decode(1, 4096, 32, 32)
    bench_decode(1, 4096, 32, 32, quant='static')
    bench_decode(128, 2048, 32, 32, quant='static')
    # the decode steps of the B2 int8 rows as their graphs launch them (hint = session_len):
    # max:128:2048 (118 sessions, mean context ~1150) and 64:2048:2048 (mean ~3070)
    bench_decode(118, 1152, 32, 32, quant='static', sweep=sweep, hint=2176)
    bench_decode(64, 3072, 32, 32, quant='static', sweep=sweep, hint=4104)
    for quant in ('static', 'online'):
        bench_store_int8(4096, quant)
        bench_store_int8(64, quant)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='bench_kernels.json')
    ap.add_argument('--sweep', action='store_true')
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--only', choices=['all', 'int8', 'rotary_store_kv', 'decode', 'prefill',
                                       'dense_prompt'],
                    default='all',
                    help='int8: only the int8 KV rows and the fp16 rows they compare with; '
                         'rotary_store_kv: only the fused vs separate rotary + KV store rows; '
                         'decode: the decode attention at the engine steps profile_step.py '
                         'looks at, launched with the graphs\' session_len hint; prefill: a '
                         '2048-token prompt against torch SDPA\'s flash and cuDNN backends; '
                         'dense_prompt: the dense prompt path\'s attention, cuDNN SDPA against '
                         'the Triton kernel (with --sweep: its tiles) at 1025-8192 tokens')
    ap.add_argument('--decode_cases', default=None, metavar='B:CTX[:HINT],...',
                    help="with --only decode: these decode shapes instead of the default set "
                         "(B rows over CTX tokens, launched with max_kv_len HINT as a graph "
                         "would, e.g. 4:600:4096 for B4's steps under api_server's "
                         "session_len)")
    a = ap.parse_args()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    info = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, decode_cfg=tpa.DECODE_CFG, prefill_cfg=tpa.PREFILL_CFG,
                argv=sys.argv)
    print(info)
    print(HEADER)
    copy_bandwidth()
    if a.only == 'int8':
        bench_int8(a.sweep)
        return finish(info, t0, a.out)
    if a.only == 'prefill':
        bench_prefill([(0, 2048)], 32, 32, name='1x2048 new, MHA', with_sdpa=True,
                      sweep=a.sweep)
        bench_prefill([(0, 2048)], 32, 8, name='1x2048 new, GQA8', with_sdpa=True)
        bench_prompt_first_calls()
        return finish(info, t0, a.out)
    if a.only == 'dense_prompt':
        bench_dense_prompt(2048, 32, 32, sweep=a.sweep)
        bench_dense_prompt(2048, 32, 8)
        for T in (1025, 1536, 2560, 3072, 4096, 8192):
            bench_dense_prompt(T, 32, 32)
        bench_dense_prompt(4096, 32, 8)
        return finish(info, t0, a.out)
    if a.only == 'decode' and a.decode_cases:
        for case in a.decode_cases.split(','):
            B, ctx, *hint = (int(x) for x in case.split(':'))
            bench_decode(B, ctx, 32, 32, sweep=a.sweep, hint=hint[0] if hint else 0)
        return finish(info, t0, a.out)
    if a.only == 'decode':
        for B, ctx in ((64, 64), (64, 128), (1, 1100), (1, 2048), (146, 500), (64, 4096)):
            bench_decode(B, ctx, 32, 32, sweep=a.sweep, hint=max(2048, ctx))
        for ctx in (300, 1100):  # B1 as profile_generation's graphs launch it (session_len 4096)
            bench_decode(1, ctx, 32, 32, sweep=a.sweep, hint=4096)
        if a.sweep:
            bench_decode(108, 1150, 32, 32, sweep=True, quant='static', hint=2176)
        return finish(info, t0, a.out)
    if a.only == 'rotary_store_kv':
        for T in (1, 64, 512, 4096):
            bench_rotary_store_kv(T, sweep=a.sweep)
        bench_rotary_store_kv(1, hkv=8)
        bench_rotary_store_kv(4096, hkv=8)
        return finish(info, t0, a.out)
    bench_decode(64, 4096, 32, 32, sweep=a.sweep, with_ref=not a.quick, with_sdpa=True)
    bench_decode(64, 4096, 32, 8, sweep=a.sweep, with_sdpa=True)
    bench_decode(64, 4096, 32, 32, dtype=torch.bfloat16)
    bench_decode(1, 4096, 32, 32, sweep=a.sweep and not a.quick)
    bench_decode(1, 4096, 32, 8)
    bench_decode(16, 2048, 32, 8, page=16)
    bench_decode(128, 1024, 32, 32)
    bench_prefill([(0, 2048)], 32, 32, name='1x2048 new, MHA', with_sdpa=True, sweep=a.sweep)
    bench_prefill([(0, 2048)], 32, 8, name='1x2048 new, GQA8', with_sdpa=True)
    bench_prefill([(1536, 512)] * 4, 32, 32, name='4x512 chunk on 1536 prefix')
    bench_prefill([(4000, 1)] * 60 + [(1024, 256)] * 4, 32, 8, name='60 decode + 4x256 chunks')
    # its two halves alone (run 2 left the mixed case unexplained: see NOTES.md)
    bench_prefill([(4000, 1)] * 60, 32, 8, name='60 decode only (GQA8)')
    bench_prefill([(1024, 256)] * 4, 32, 8, name='4x256 chunks on 1024 (GQA8)')
    for T in (64, 4096):
        bench_elementwise(T)
    for T in (1, 64, 512, 4096):
        bench_rotary_store_kv(T)
    bench_int8(False)
    finish(info, t0, a.out)


def finish(info, t0, out):
    info['seconds'] = time.time() - t0
    print('\n' + HEADER)
    for r in ROWS:
        print(fmt_row(r))
    with open(out, 'w') as f:
        json.dump(dict(info=info, rows=ROWS), f, indent=1, default=str)


if __name__ == '__main__':
    main()
