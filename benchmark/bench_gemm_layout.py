"""cuBLAS on the Llama-2-7B weight GEMMs in both weight layouts, per token count.

    python3 benchmark/bench_gemm_layout.py --out gemm_layout.json
    python3 benchmark/bench_gemm_layout.py --tokens 1,16 --dtype bf16

The engine stores layer weights as v0.0.2 wrote them, [in, out] (N contiguous), and computes
`x @ w`; at a few tokens cuBLAS then splits K and adds a reduce kernel (benchmark/NOTES.md:
0.06 ms per token at bs1). The other layout, [out, in] (K contiguous, `F.linear(x, w_t)`), is
the classic GEMV shape. For each M this times, in CUDA graphs, 32 layers' worth of each GEMM
(distinct weights, so nothing stays in L2) and the whole per-token chain (32 x qkv, o, w13, w2
plus the LM head) in each layout, and prints us per GEMM, achieved TB/s of weight reads and
the speed-up of [out, in]. CUDA only.

Result on the H100 (benchmark/NOTES.md, session 5): [out, in] is slower at every M from 1 to
64 (whole token at M=1: 5.20 vs 4.80 ms) and B1 end to end ran 165.7 vs 176.3 tok/s with the
layer weights transposed, so the engine keeps v0.0.2's [in, out].
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

# (name, in K, out N) of one Llama-2-7B layer, then the LM head (once per token)
LAYER = (('qkv', 4096, 12288), ('o', 4096, 4096), ('w13', 4096, 22016), ('w2', 11008, 4096))
HEAD = ('lm_head', 4096, 32000)
LAYERS = 32
DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def graph_ms(fn, reps: int) -> float:
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=reps, return_mode='median')


def weights(k: int, n: int, count: int, dtype, layout: str):
    g = torch.Generator(device='cuda').manual_seed(k * 7 + n)
    shape = (k, n) if layout == 'kn' else (n, k)
    return [torch.randn(shape, device='cuda', dtype=dtype, generator=g) * 0.02
            for _ in range(count)]


def gemm(x, w, layout: str):
    return x @ w if layout == 'kn' else F.linear(x, w)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tokens', default='1,2,4,8,16,64,256',
                   help='comma-separated token counts M (default: %(default)s)')
    p.add_argument('--dtype', choices=sorted(DTYPES), default='fp16',
                   help='weight and activation dtype (default: %(default)s)')
    p.add_argument('--reps', type=int, default=200,
                   help='ms of timed graph replays per measurement (default: %(default)s)')
    p.add_argument('--out', default=None, help='write the rows as JSON')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error('needs a CUDA GPU')
    try:
        tokens = [int(t) for t in args.tokens.split(',')]
    except ValueError:
        p.error(f'--tokens takes comma-separated integers, got {args.tokens!r}')
    dtype = DTYPES[args.dtype]
    t0 = time.time()
    rows = []
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}')
    print('| M | GEMM | [in, out] us | [out, in] us | [in, out] TB/s | [out, in] TB/s | speed-up |')
    print('|---|---|---|---|---|---|---|')
    for layout in ('kn', 'nk'):  # allocate one layout at a time: the chain is 13.5 GB
        ws = {name: weights(k, n, LAYERS, dtype, layout) for name, k, n in LAYER}
        ws[HEAD[0]] = weights(HEAD[1], HEAD[2], 1, dtype, layout)
        for m in tokens:
            xs = {k: torch.randn(m, k, device='cuda', dtype=dtype) for k in (4096, 11008)}
            for name, k, n in LAYER + (HEAD,):
                chain = ws[name]
                ms = graph_ms(lambda: [gemm(xs[k], w, layout) for w in chain], args.reps)
                rows.append(dict(m=m, gemm=name, layout=layout, us=ms * 1e3 / len(chain),
                                 tb_s=k * n * dtype.itemsize * len(chain) / ms / 1e9))

            def token():
                for i in range(LAYERS):
                    for name, k, _ in LAYER:
                        gemm(xs[k], ws[name][i], layout)
                gemm(xs[4096], ws[HEAD[0]][0], layout)

            rows.append(dict(m=m, gemm='token', layout=layout,
                             us=graph_ms(token, args.reps) * 1e3))
        ws.clear()
        torch.cuda.empty_cache()
    by = {(r['m'], r['gemm'], r['layout']): r for r in rows}
    for m in tokens:
        for name in [g for g, _, _ in LAYER] + [HEAD[0], 'token']:
            a, b = by[(m, name, 'kn')], by[(m, name, 'nk')]
            tb = (f"{a['tb_s']:.2f} | {b['tb_s']:.2f}" if 'tb_s' in a else '- | -')
            print(f"| {m} | {name} | {a['us']:.1f} | {b['us']:.1f} | {tb} | "
                  f"{a['us'] / b['us']:.3f} |", flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(argv=sys.argv, gpu=torch.cuda.get_device_name(), dtype=args.dtype,
                           seconds=time.time() - t0, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
