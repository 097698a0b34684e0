"""Replay a throughput workload through the real C++ scheduler on the CPU, without a model.

    python benchmark/replay_schedule.py --num_blocks 1812 --admit_horizon -1,32
    python benchmark/replay_schedule.py --num_prompts 3000 --concurrency 256 --out replay.json

The requests of profile_throughput.py's synthetic set (same seed, same lengths) are fed, at a
fixed concurrency, to `_turbomind.Scheduler`; every step is planned and committed with a
stand-in token (never EOS: the requests run to their output length, as with ignore_eos). What
the scheduler did is exact: steps, rows per step, preemptions, prefill tokens computed (more than
the prompts' when preempted requests are prefilled again), the KV tokens each step reads. Time
is only a model, printed apart and labelled so: per step, the weights once (`--weights_ms`),
every row's KV at `--kv_tb_s`, and 2 x params FLOPs per prefill token at `--prefill_tflops`
(defaults: Llama-2-7B fp16 on the H100 as benchmark/NOTES.md measured them); "tail" is the
part after the last request was submitted, when the batch drains. It compares
scheduling policies (`--admit_horizon`, `--max_prefill_tokens`, `--max_mixed_prefill_tokens`,
the pool size) in seconds, before spending GPU time on them.

The default pool, 1812 blocks of 64 tokens (~116k tokens), is what `profile_throughput.py
--dummy llama2-7b --cache_max_entry_count 0.9` gets on an H100 80GB.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_throughput import sample_synthetic  # noqa: E402

KV_BYTES_PER_TOKEN = 512 * 1024  # Llama-2-7B fp16: 32 layers x K, V x 4096 x 2 bytes
PARAMS = 6.74e9


def replay(requests, concurrency, num_blocks, block_size, max_batch_size, max_prefill_tokens,
           admit_horizon, session_len, weights_ms, kv_tb_s, prefill_tflops,
           kv_bytes=KV_BYTES_PER_TOKEN, max_mixed_prefill_tokens=0):
    from lmdeploy.turbomind import _turbomind
    s = _turbomind.Scheduler(num_blocks=num_blocks, block_size=block_size,
                             max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                             session_len=session_len, vocab_size=32000,
                             admit_horizon=admit_horizon,
                             max_mixed_prefill_tokens=max_mixed_prefill_tokens)
    live, nxt = set(), 0
    rows, prefill, kv_read, model_s = [], 0, 0, 0.0
    queued_until, queued_s = 0, 0.0  # steps (and model time) while requests were still queued
    t0 = time.perf_counter()
    while True:
        while len(live) < concurrency and nxt < len(requests):
            ids, n_out = requests[nxt]
            live.add(s.submit(nxt + 1, ids, request_output_len=n_out, sequence_start=True,
                              sequence_end=True, ignore_eos=True))
            nxt += 1
        if not live:
            break
        plan = s.schedule()
        b, t, d = plan.batch_size, plan.num_tokens, plan.num_decode
        kv = int(plan.kv_lens[:b].sum()) if b else 0
        rows.append(b)
        prefill += t - d
        kv_read += kv
        model_s += (weights_ms * 1e-3 + kv * kv_bytes / (kv_tb_s * 1e12)
                    + 2 * PARAMS * (t - d) / (prefill_tflops * 1e12))
        if nxt < len(requests):
            queued_until, queued_s = len(rows), model_s
        events = s.update(np.full(plan.num_samples, 7, dtype=np.int32))
        for handle, done in zip(events.handles.tolist(), events.finished.tolist()):
            if done:
                live.discard(handle)
    rows = np.array(rows)
    prompts = sum(len(ids) for ids, _ in requests)
    return dict(admit_horizon=admit_horizon, requests=len(requests), steps=len(rows),
                rows_per_step=float(rows.mean()),
                rows_per_step_while_queued=float(rows[:queued_until].mean()) if queued_until else 0.0,
                preemptions=int(s.num_preemptions()), prompt_tokens=prompts,
                prefill_tokens=int(prefill), recomputed_tokens=int(prefill) - prompts,
                kv_tokens_read=int(kv_read), model_s=model_s, model_tail_s=model_s - queued_s,
                model_req_s=len(requests) / model_s, replay_s=time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--num_prompts', type=int, default=3000,
                   help='requests of the synthetic set (default: %(default)s)')
    p.add_argument('--concurrency', type=int, default=256,
                   help='requests in flight at once (default: %(default)s)')
    p.add_argument('--static', default=None, metavar='C:IN:OUT',
                   help="instead of the synthetic set: C requests of IN prompt tokens and OUT new "
                        "tokens submitted together (a B2 row, e.g. 64:2048:2048)")
    p.add_argument('--kv_bytes', type=int, default=KV_BYTES_PER_TOKEN,
                   help='time model: KV bytes per token (default: %(default)s, fp16 Llama-2-7B; '
                        'int8 KV: half)')
    p.add_argument('--seed', type=int, default=0,
                   help="the synthetic set's seed, as profile_throughput.py's (default: %(default)s)")
    p.add_argument('--num_blocks', type=int, default=1812,
                   help='KV pool size in blocks (default: %(default)s, the H100 pool)')
    p.add_argument('--block_size', type=int, default=64, help='tokens per block (default: %(default)s)')
    p.add_argument('--max_batch_size', type=int, default=256,
                   help='persistent batch size (default: %(default)s)')
    p.add_argument('--max_prefill_tokens', type=int, default=65536,
                   help="one step's prefill token budget (default: %(default)s, the engine's at "
                        'max_batch_size 256 and session_len 4096)')
    p.add_argument('--max_mixed_prefill_tokens', type=int, default=0,
                   help='the prefill budget of a step that also decodes (default: %(default)s, '
                        "none beyond --max_prefill_tokens; api_server's default is 512)")
    p.add_argument('--session_len', type=int, default=4096, help='(default: %(default)s)')
    p.add_argument('--admit_horizon', default='-1,32',
                   help='comma-separated admit_horizon values to replay, one row each; -1 admits '
                        'greedily (default: %(default)s)')
    p.add_argument('--weights_ms', type=float, default=4.9,
                   help='time model: ms to read the weights once per step (default: %(default)s)')
    p.add_argument('--kv_tb_s', type=float, default=3.07,
                   help='time model: KV read rate in TB/s (default: %(default)s)')
    p.add_argument('--prefill_tflops', type=float, default=750.0,
                   help='time model: prefill GEMM rate in TFLOP/s (default: %(default)s)')
    p.add_argument('--out', default=None, help='write the rows as JSON')
    args = p.parse_args(argv)
    try:
        horizons = [int(h) for h in args.admit_horizon.split(',')]
    except ValueError:
        p.error(f'--admit_horizon takes comma-separated integers, got {args.admit_horizon!r}')
    if min(args.num_prompts, args.concurrency, args.num_blocks, args.block_size,
           args.max_batch_size, args.max_prefill_tokens) < 1 or args.max_mixed_prefill_tokens < 0:
        p.error('--num_prompts, --concurrency, --num_blocks, --block_size, --max_batch_size and '
                '--max_prefill_tokens must be >= 1, --max_mixed_prefill_tokens >= 0')
    if args.static:
        try:
            c, n_in, n_out = (int(v) for v in args.static.split(':'))
        except ValueError:
            p.error(f'--static takes C:IN:OUT, got {args.static!r}')
        requests = [([3 + (i % 1000)] * n_in, n_out) for i in range(c)]
        args.concurrency, args.num_prompts = c, c
    else:
        requests = sample_synthetic(args.num_prompts, 32000, args.seed, args.session_len)
    results = []
    kind = f'static {args.static}' if args.static else 'synthetic'
    print(f'{args.num_prompts} {kind} requests at concurrency {args.concurrency}, pool '
          f'{args.num_blocks} x {args.block_size} tokens, max_batch_size {args.max_batch_size}, '
          f'max_prefill_tokens {args.max_prefill_tokens} '
          f'({args.max_mixed_prefill_tokens or args.max_prefill_tokens} beside decoding)')
    print('| admit_horizon | steps | rows/step | rows/step (queue full) | preemptions | '
          'prefill tokens | recomputed | model s (tail) | model req/s |')
    print('|---|---|---|---|---|---|---|---|---|')
    for h in horizons:
        r = replay(requests, args.concurrency, args.num_blocks, args.block_size,
                   args.max_batch_size, args.max_prefill_tokens, h, args.session_len,
                   args.weights_ms, args.kv_tb_s, args.prefill_tflops, args.kv_bytes,
                   args.max_mixed_prefill_tokens)
        results.append(r)
        print(f"| {h} | {r['steps']} | {r['rows_per_step']:.0f} | "
              f"{r['rows_per_step_while_queued']:.0f} | {r['preemptions']} | "
              f"{r['prefill_tokens']} | {r['recomputed_tokens']} | {r['model_s']:.1f} "
              f"({r['model_tail_s']:.1f}) | "
              f"{r['model_req_s']:.1f} |", flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), rows=results), f, indent=1)


if __name__ == '__main__':
    main()
