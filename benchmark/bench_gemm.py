"""Small-M GEMMs on a CUDA GPU: cuBLAS (torch.matmul / F.linear) vs the Triton weight-streaming
kernel (lmdeploy/turbomind/kernels/triton_linear.py); prints a table, writes JSON.

    python3 benchmark/bench_gemm.py --out gemm.json [--ms 1,2,4,8,16,32,64] [--budget 90]
                                    [--layer_layouts kn,nk]
                                    [--no-sweep] [--no-total] [--models llama2-7b,llama3-8b]

M >= 128 (B4's mixed steps pad a ~220-token prompt to 224-256 rows, where cuBLAS runs at ~450
TFLOP/s: 96 CTAs on 132 SMs) sweeps tensor-core tiles, e.g. `--ms 224,256 --no-total`.

Shapes: the Llama-2-7B and Llama-3-8B projections at tp=1, fp16: qkv, wo, w13, w2 (the
workspace's [in, out] weights, x @ w) and the LM head (F.linear(x, output); Triton gets the
view output.t()). Every time is one CUDA-graph replay of 20 calls / 20 (median of --reps
replays) over rotating weight copies that together exceed the L2 several times, so every call
streams its weight from HBM as the model's 32 distinct layers do. GB/s counts weight + x + out
bytes; % is of 3.0 TB/s (the H100's measured copy rate, BENCHMARKS.md).

Per (shape, M): cuBLAS, Triton with its own table (`table`), and a bounded sweep of configs
(tile, split-K, warps, stages). The fastest Triton config is printed as a TUNED row for
triton_linear.py (None where cuBLAS stays faster). The sweep is bounded by --budget seconds of
wall time (Triton compiles dominate; M=1 goes first).

Per-token total (the number that matters for bs1 decode): ONE graph over a whole token's GEMMs
at M=1 (32 layers x qkv, wo, w13, w2 with distinct weights, then the LM head: 13.2 GB for
Llama-2-7B), for cuBLAS, the Triton table, Triton with the best swept config per shape, and
`hybrid` (the faster of cuBLAS and best Triton per shape).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK = 3.0e12  # bytes/s: measured H100 device-to-device copy (BENCHMARKS.md)
CALLS = 20  # calls per captured graph
MODELS = {  # name -> {projection: (K, N)}; 'lm_head' is F.linear(x, output[N, K])
    'llama2-7b': dict(qkv=(4096, 12288), wo=(4096, 4096), w13=(4096, 22016), w2=(11008, 4096),
                      lm_head=(4096, 32000)),
    'llama3-8b': dict(qkv=(4096, 6144), wo=(4096, 4096), w13=(4096, 28672), w2=(14336, 4096),
                      lm_head=(4096, 128256)),
}
LAYERS = 32
DTYPE = torch.float16
DEV = 'cuda'


def shapes(models, layer_layouts=('kn',)):
    """Unique (K, N, layout) -> label, e.g. 'llama2-7b.qkv'; the layer projections in each of
    `layer_layouts` ('nk': stored [out, in], K contiguous, labelled 'qkv[nk]')."""
    out = {}
    for model in models:
        for name, (K, N) in MODELS[model].items():
            for layout in (('nk',) if name == 'lm_head' else layer_layouts):
                tag = '' if name == 'lm_head' or layout == 'kn' else f'[{layout}]'
                out.setdefault((K, N, layout), []).append(f'{model}.{name}{tag}')
    return {k: '+'.join(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- sweep space
def candidates(M, layout, K, N, table_cfg):
    """Bounded configs for one (shape, M): a few tiles per M bucket, split-K from the kernel's
    rule, plus split variants (none / half / double) of the table's tile. Tiles repeat across
    shapes, so most compiles are shared."""
    from lmdeploy.turbomind.kernels import triton_linear as tlin
    C = tlin.Cfg
    b = tlin.m_bucket(M)
    dot16 = [C(True, 16, 64, 128, 0, 4, 4), C(True, 16, 128, 64, 0, 4, 4),
             C(True, 16, 64, 64, 0, 4, 3), C(True, 16, 128, 128, 0, 8, 3)]
    # M >= 128 (a mixed step's prompt tokens): FLOP-bound, tensor-core tiles; split 1 = none
    mid = [C(True, 128, 128, 64, 1, 8, 3), C(True, 128, 128, 64, 0, 8, 3),
           C(True, 128, 256, 64, 1, 8, 3), C(True, 64, 256, 64, 1, 8, 3),
           C(True, 128, 128, 64, 2, 8, 4)]
    if b >= 128:
        tiles = mid
    elif layout == 'kn':
        if b == 1:
            tiles = [C(False, 1, 128, 64, 0, 4, 4), C(False, 1, 128, 64, 0, 4, 1),
                     C(False, 1, 256, 32, 0, 4, 3), C(False, 1, 64, 128, 0, 4, 3),
                     C(False, 1, 128, 128, 0, 8, 3), C(False, 1, 256, 64, 0, 8, 2),
                     C(False, 1, 64, 64, 0, 2, 4),
                     # 1 KiB row segments, as the K-contiguous LM head's (3.07 TB/s there)
                     C(False, 1, 512, 16, 0, 4, 3), C(False, 1, 512, 32, 0, 8, 3)] + dot16[:2]
        elif b == 2:
            tiles = [C(False, 2, 64, 64, 0, 4, 3), C(False, 2, 256, 32, 0, 8, 3)] + dot16[:3]
        elif b == 4:
            tiles = [C(False, 4, 64, 32, 0, 4, 3), C(False, 4, 128, 32, 0, 8, 3)] + dot16[:3]
        elif b <= 16:
            tiles = dot16 + [C(True, 16, 32, 256, 0, 4, 3)]
        elif b == 32:
            tiles = [C(True, 32, 128, 64, 0, 4, 4), C(True, 32, 64, 64, 0, 4, 4),
                     C(True, 32, 128, 128, 0, 8, 3)]
        else:
            tiles = [C(True, 64, 128, 64, 0, 4, 3), C(True, 64, 64, 128, 0, 4, 3),
                     C(True, 64, 128, 128, 0, 8, 3), C(True, 64, 128, 64, 0, 8, 4)]
    else:  # LM head: K contiguous, long rows along K
        if b == 1:
            tiles = [C(False, 1, 64, 128, 0, 4, 3), C(False, 1, 16, 512, 0, 4, 3),
                     C(False, 1, 32, 256, 0, 4, 4), C(False, 1, 64, 256, 0, 8, 3),
                     C(False, 1, 32, 256, 0, 4, 1), dot16[0]]
        elif b == 2:
            tiles = [C(False, 2, 16, 256, 0, 4, 3)] + dot16[:2]
        elif b <= 16:
            tiles = dot16[:3]
        elif b == 32:
            tiles = [C(True, 32, 128, 64, 0, 4, 4), C(True, 32, 64, 64, 0, 4, 4)]
        else:
            tiles = [C(True, 64, 128, 64, 0, 4, 3), C(True, 64, 64, 128, 0, 4, 3)]
    dev = torch.device(DEV, torch.cuda.current_device()) if DEV == 'cuda' else torch.device(DEV)
    out = []
    for cfg in tiles:
        out.append(cfg._replace(split_k=tlin.plan(M, K, N, cfg, dev)[1]))
    if table_cfg is not None:
        s = tlin.plan(M, K, N, table_cfg, dev)[1]
        for v in {1, max(1, s // 2), min(tlin.MAX_SPLIT, 2 * s)}:
            out.append(table_cfg._replace(split_k=v))
    seen, uniq = set(), []
    for c in out:  # resolved splits: two tiles that only differ by 0 vs its value are one
        key = c._replace(split_k=tlin.plan(M, K, N, c, dev)[1])
        if key not in seen:
            seen.add(key)
            uniq.append(key)
    return uniq


# ----------------------------------------------------------------------------- timing
def graph_ms(calls, reps):
    """Median ms of one replay of a graph of `calls` (closures, warmed up first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: Triton compiles, scratch, cuBLAS handles
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):  # torch.cuda.graph() minus its gc.collect (~50 ms a time)
        g.capture_begin()
        for f in calls:
            f()
        g.capture_end()
    g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in ev)
    del g
    return ms


class Problem:
    """One shape: its weights (rotating copies, > 4x L2 together) and an x per M."""

    def __init__(self, K, N, layout, l2_bytes):
        self.K, self.N, self.layout = K, N, layout
        wbytes = K * N * 2
        n = max(1, math.ceil(max(4 * l2_bytes, 256 << 20) / wbytes))
        self.ws = [torch.empty(N, K, device=DEV, dtype=DTYPE).normal_(std=0.02)
                   if layout == 'nk' else
                   torch.empty(K, N, device=DEV, dtype=DTYPE).normal_(std=0.02)
                   for _ in range(n)]
        self.x = {}

    def xm(self, M):
        if M not in self.x:
            self.x[M] = torch.randn(M, self.K, device=DEV, dtype=DTYPE)
        return self.x[M]

    def cublas(self, M):
        x = self.xm(M)
        if self.layout == 'nk':
            return [lambda w=w: F.linear(x, w) for w in self._cycle()]
        return [lambda w=w: torch.matmul(x, w) for w in self._cycle()]

    def triton(self, M, cfg):
        from lmdeploy.turbomind.kernels.triton_linear import linear_triton
        x = self.xm(M)
        ws = [w.t() if self.layout == 'nk' else w for w in self._cycle()]
        return [lambda w=w: linear_triton(x, w, cfg) for w in ws]

    def _cycle(self):
        return [self.ws[i % len(self.ws)] for i in range(CALLS)]

    def nbytes(self, M):
        return 2 * (self.K * self.N + M * self.K + M * self.N)


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def cfg_str(c):
    if c is None:
        return 'cuBLAS'
    kind = 'dot' if c.use_dot else 'fma'
    return (f'{kind} m{c.block_m} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} '
            f'st{c.num_stages}')


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    ap.add_argument('--out', default=None, help='JSON output path')
    ap.add_argument('--ms', default='1,2,4,8,16,32,64', help='token counts M')
    ap.add_argument('--models', default='llama2-7b,llama3-8b')
    ap.add_argument('--budget', type=float, default=90.0,
                    help='seconds of wall time for the config sweep (compiles dominate)')
    ap.add_argument('--reps', type=int, default=10, help='graph replays per timing')
    ap.add_argument('--no-sweep', action='store_true', help='cuBLAS and the table only')
    ap.add_argument('--no-total', action='store_true', help='skip the per-token totals')
    ap.add_argument('--layer_layouts', default='kn',
                    help="layouts of the layer projections: 'kn' (the workspace's [in, out]), "
                         "'nk' ([out, in], K contiguous, as the LM head; cuBLAS then runs "
                         "F.linear), or 'kn,nk' for both")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('bench_gemm.py needs a CUDA GPU')

    import triton

    from lmdeploy.turbomind.kernels import triton_linear as tlin

    t_start = time.time()
    Ms = [int(m) for m in args.ms.split(',')]
    models = args.models.split(',')
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, 'L2_cache_size', 50 << 20)
    meta = dict(device=props.name, sms=props.multi_processor_count, l2_bytes=l2,
                torch=torch.__version__, triton=triton.__version__, peak_bytes_s=PEAK,
                calls_per_graph=CALLS, reps=args.reps)
    print(json.dumps(meta), flush=True)
    summary = []  # the table, TUNED rows and totals, also written beside the JSON (.txt)

    def say(line=''):
        print(line, flush=True)
        summary.append(line)
    shp = shapes(models, args.layer_layouts.split(','))
    rows = []
    cublas_us, best = {}, {}  # (K, N, layout, M) -> us; -> (us, cfg) of the fastest Triton

    def record(label, K, N, layout, M, impl, cfg, ms, err, prob):
        us = 1e3 * ms / CALLS
        gbs = prob.nbytes(M) / (us * 1e-6) / 1e9
        row = dict(shape=label, K=K, N=N, layout=layout, M=M, impl=impl, cfg=cfg_str(cfg),
                   cfg_tuple=list(cfg) if cfg is not None else None, us=us, GBps=gbs,
                   pct_peak=100 * gbs * 1e9 / PEAK, rel_err=err)
        rows.append(row)
        key = (K, N, layout, M)
        if impl == 'cublas':
            cublas_us[key] = us
        elif not math.isnan(us) and err is not None and err < 1e-2:
            if key not in best or us < best[key][0]:
                best[key] = (us, cfg)
        return row

    def run_triton(prob, M, cfg, ref):
        try:
            out = prob.triton(M, cfg)[0]()
            err = rel_err(out, ref)
            ms = graph_ms(prob.triton(M, cfg), args.reps)
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is skipped
            print(f'    {cfg_str(cfg)}: failed {type(e).__name__}: {str(e)[:160]}', flush=True)
            return float('nan'), None
        return ms, err

    hdr = (f"{'shape':<28} {'M':>3} {'cuBLAS us':>9} {'%':>5} {'table us':>9} {'%':>5} "
           f"{'best us':>8} {'%':>5} {'speedup':>7}  best Triton config")
    # pass 1: cuBLAS + table at every M, sweep at M=1; pass 2: sweep the other M (budget)
    sweep_t0 = None
    for pass_ in (1, 2):
        for (K, N, layout), label in shp.items():
            todo = [m for m in Ms if (pass_ == 1) or (m != 1 and not args.no_sweep)]
            if pass_ == 2 and sweep_t0 and time.time() - sweep_t0 > args.budget:
                todo = []
            if not todo:
                continue
            prob = Problem(K, N, layout, l2)
            for M in todo:
                x = prob.xm(M)
                ref = prob.cublas(M)[0]()
                table = tlin.get_config(M, K, N, layout) or tlin.default_config(M, layout)
                if pass_ == 1:
                    ms = graph_ms(prob.cublas(M), args.reps)
                    record(label, K, N, layout, M, 'cublas', None, ms, 0.0, prob)
                    if table is not None:
                        ms, err = run_triton(prob, M, table, ref)
                        record(label, K, N, layout, M, 'table', table, ms, err, prob)
                if args.no_sweep or (pass_ == 1 and M != 1):
                    continue
                sweep_t0 = sweep_t0 or time.time()
                for cfg in candidates(M, layout, K, N, table):
                    if time.time() - sweep_t0 > args.budget:
                        break
                    ms, err = run_triton(prob, M, cfg, ref)
                    record(label, K, N, layout, M, 'sweep', cfg, ms, err, prob)
                b = best.get((K, N, layout, M), (float('nan'), None))
                print(f'  {label} M={M}: cuBLAS {cublas_us[(K, N, layout, M)]:.1f} us, best '
                      f'Triton {b[0]:.1f} us ({cfg_str(b[1])}), {time.time() - t_start:.0f} s',
                      flush=True)
                del x
            del prob
            torch.cuda.empty_cache()
        if sweep_t0 and time.time() - sweep_t0 > args.budget:
            print(f'(sweep budget of {args.budget:.0f} s spent: later points unswept)', flush=True)

    say('\n' + hdr)
    tuned = []

    def f(r, key, spec):
        return format(r[key], spec) if r is not None else '-'
    for (K, N, layout), label in shp.items():
        for M in Ms:
            rs = [r for r in rows if (r['K'], r['N'], r['layout'], r['M']) == (K, N, layout, M)]
            cb = next(r for r in rs if r['impl'] == 'cublas')
            tb = next((r for r in rs if r['impl'] == 'table'), None)
            tri = [r for r in rs if r['impl'] != 'cublas' and r['rel_err'] is not None
                   and r['rel_err'] < 1e-2 and not math.isnan(r['us'])]
            bt = min(tri, key=lambda r: r['us']) if tri else None
            speedup = cb['us'] / bt['us'] if bt else float('nan')
            say(f"{label[:28]:<28} {M:>3} {f(cb, 'us', '9.1f')} {f(cb, 'pct_peak', '5.1f')} "
                f"{f(tb, 'us', '9.1f')} {f(tb, 'pct_peak', '5.1f')} {f(bt, 'us', '8.1f')} "
                f"{f(bt, 'pct_peak', '5.1f')} {speedup:7.3f}  {bt['cfg'] if bt else '-'}")
            cfg = bt['cfg_tuple'] if bt is not None and bt['us'] < cb['us'] else None
            tuned.append(dict(key=[layout, K, N, tlin.m_bucket(M)], cfg=cfg,
                              triton_us=bt['us'] if bt else None, cublas_us=cb['us']))
    say('\n# TUNED rows for lmdeploy/turbomind/kernels/triton_linear.py (None: cuBLAS wins)')
    for t in tuned:
        c = f"Cfg{tuple(t['cfg'])}" if t['cfg'] else 'None'
        say(f"TUNED[{tuple(t['key'])}] = {c}  # {t['triton_us'] or float('nan'):.1f} us vs "
            f"cuBLAS {t['cublas_us']:.1f} us")

    totals = []
    if not args.no_total:
        for model in models:
            totals += token_totals(model, rows, best, cublas_us, args.reps, say)

    result = dict(meta=meta, rows=rows, tuned=tuned, totals=totals,
                  wall_s=round(time.time() - t_start, 1))
    say(f'\nwall {result["wall_s"]} s')
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.splitext(args.out)[0] + '.txt', 'w') as fh:
            fh.write('\n'.join(summary) + '\n')
        print(f'wrote {args.out} and its .txt')


def token_totals(model, rows, best, cublas_us, reps, say=print):
    """One graph over a whole token's GEMMs at M=1 (distinct weights per layer), per variant;
    also the sum of the per-shape times (32 x layer GEMMs + LM head) for comparison."""
    from lmdeploy.turbomind.kernels.triton_linear import linear_triton
    spec = MODELS[model]
    torch.cuda.empty_cache()
    layers = [{name: torch.empty(K, N, device=DEV, dtype=DTYPE).normal_(std=0.02)
               for name, (K, N) in spec.items() if name != 'lm_head'} for _ in range(LAYERS)]
    Kh, V = spec['lm_head']
    head = torch.empty(V, Kh, device=DEV, dtype=DTYPE).normal_(std=0.02)
    xs = {}
    for K, _ in spec.values():
        xs.setdefault(K, torch.randn(1, K, device=DEV, dtype=DTYPE))
    gemms = [(xs[w.shape[0]], w, 'kn') for lw in layers for w in lw.values()]
    gemms.append((xs[Kh], head, 'nk'))
    nbytes = sum(w.numel() * 2 for _, w, _ in gemms)

    def key(w, layout):
        K, N = (w.shape[1], w.shape[0]) if layout == 'nk' else tuple(w.shape)
        return K, N, layout, 1

    def choice(k, impl):
        """'cublas', or the Triton config for this shape (None: the kernel's table)."""
        b_us, b_cfg = best.get(k, (float('inf'), None))
        if impl == 'cublas' or (impl == 'hybrid' and not b_us < cublas_us.get(k, 0.0)):
            return 'cublas'
        return None if impl == 'table' else b_cfg

    def call(x, w, layout, impl):
        c = choice(key(w, layout), impl)
        if c == 'cublas':
            return (lambda: F.linear(x, w)) if layout == 'nk' else (lambda: torch.matmul(x, w))
        wt = w.t() if layout == 'nk' else w
        return lambda: linear_triton(x, wt, c)

    def shape_sum(impl):
        tot = 0.0
        for _, w, layout in gemms:
            k = key(w, layout)
            c = choice(k, impl)
            us = cublas_us.get(k) if c == 'cublas' else best.get(k, (None,))[0]
            if impl == 'table':
                us = table_us.get(k)
            if us is None:
                return None
            tot += us
        return tot / 1e3

    table_us = {}
    for r in rows:
        if r['impl'] == 'table' and r['M'] == 1:
            table_us[(r['K'], r['N'], r['layout'], 1)] = r['us']
    out = []
    ref_ms = None
    for impl in ('cublas', 'table', 'best', 'hybrid'):
        calls = [call(x, w, layout, impl) for x, w, layout in gemms]
        try:
            ms = graph_ms(calls, reps)
        except Exception as e:  # noqa: BLE001
            print(f'{model} total {impl}: failed {type(e).__name__}: {str(e)[:200]}')
            continue
        ref_ms = ref_ms or ms
        est = shape_sum(impl)
        row = dict(model=model, impl=impl, M=1, gemms=len(calls), GB=nbytes / 1e9, ms=ms,
                   TBps=nbytes / ms / 1e9, pct_peak=100 * nbytes / (ms * 1e-3) / PEAK,
                   vs_cublas=ref_ms / ms, sum_of_shapes_ms=est)
        out.append(row)
        say(f"per-token total {model} M=1 {impl:<7}: {ms:.3f} ms for {len(calls)} GEMMs "
            f"({row['GB']:.2f} GB, {row['TBps']:.2f} TB/s, {row['pct_peak']:.1f}% of 3.0; "
            f"cuBLAS/this {row['vs_cublas']:.3f}; sum of per-shape times "
            f"{'-' if est is None else format(est, '.3f')} ms)")
    del layers, head
    torch.cuda.empty_cache()
    return out


if __name__ == '__main__':
    main()
