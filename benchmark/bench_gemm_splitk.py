"""Split-K through cuBLAS itself at a mixed step's M: one batched GEMM over the K halves (or
quarters) of x and w, fp32 partials, summed, against one cuBLAS GEMM. Prints a table, writes JSON.

    python3 benchmark/bench_gemm_splitk.py [--ms 256,320,384,512] [--splits 2,4] [--out f.json]

Why: at M = 256 cuBLAS tiles the N = 4096 projections (wo, w2) into 2 x 32 = 64 CTAs of
128 x 128 on the H100's 132 SMs, and runs them well below the copy rate (wo 19.7 us against
12.6, w2 50 against 32.6; benchmark/NOTES.md, session 11). `torch.bmm` over x viewed as
[S, M, K/S] (a strided batch of x's column blocks, no copy) and w viewed as [S, K/S, N] is one
launch of S x 64 CTAs that reads every weight byte once; the S fp32 partials are summed and
rounded once, so the result differs from the plain GEMM only by fp32 summation order.

Same harness as bench_gemm.py (CUDA graphs of 20 calls over rotating weight copies, so every
call streams its weight from HBM). Shapes: Llama-2-7B's layer projections at tp=1, fp16.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.bench_gemm import CALLS, MODELS, Problem, graph_ms, rel_err  # noqa: E402


def splitk_bmm(x: torch.Tensor, w: torch.Tensor, splits: int) -> torch.Tensor:
    """x @ w (x [M, K], w [K, N] contiguous, K % splits == 0) as one batched GEMM over K."""
    M, K = x.shape
    N = w.shape[1]
    xs = x.view(M, splits, K // splits).transpose(0, 1)  # [S, M, K/S], rows K apart
    parts = torch.bmm(xs, w.view(splits, K // splits, N), out_dtype=torch.float32)
    return parts.sum(0).to(x.dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    ap.add_argument('--ms', default='256,320,384,512', help='token counts M (default: %(default)s)')
    ap.add_argument('--splits', default='2,4', help='K splits to try (default: %(default)s)')
    ap.add_argument('--reps', type=int, default=10, help='graph replays per timing')
    ap.add_argument('--out', default=None, help='JSON output path')
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('bench_gemm_splitk.py needs a CUDA GPU')
    Ms = [int(m) for m in args.ms.split(',')]
    splits = [int(s) for s in args.splits.split(',')]
    l2 = getattr(torch.cuda.get_device_properties(0), 'L2_cache_size', 50 << 20)
    rows = []
    print('| shape | M | cuBLAS us | ' + ' | '.join(f'bmm S={s} us' for s in splits) + ' |')
    print('|---|---|---|' + '---|' * len(splits))
    for name, (K, N) in MODELS['llama2-7b'].items():
        if name == 'lm_head':
            continue
        prob = Problem(K, N, 'kn', l2)
        for M in Ms:
            x = prob.xm(M)
            ref = prob.cublas(M)[0]()
            row = dict(shape=name, K=K, N=N, M=M,
                       cublas_us=1e3 * graph_ms(prob.cublas(M), args.reps) / CALLS)
            cells = []
            for s in splits:
                if K % s:
                    cells.append('-')
                    continue
                calls = [lambda w=w, s=s: splitk_bmm(x, w, s) for w in prob._cycle()]
                row[f'bmm{s}_us'] = 1e3 * graph_ms(calls, args.reps) / CALLS
                row[f'bmm{s}_rel_err'] = rel_err(calls[0](), ref)
                cells.append(f"{row[f'bmm{s}_us']:.1f} (err {row[f'bmm{s}_rel_err']:.0e})")
            rows.append(row)
            print(f"| {name} | {M} | {row['cublas_us']:.1f} | " + ' | '.join(cells) + ' |',
                  flush=True)
        del prob
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
