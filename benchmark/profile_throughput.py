"""Request throughput of the in-process engine (BENCHMARKS.md B3; LMDeploy v0.0.2's
profile_throughput, reference section 11.2, plus latency percentiles).

    python benchmark/profile_throughput.py ShareGPT_V3_unfiltered_cleaned_split.json ./workspace \\
        --concurrency 256 --num_prompts 3000 [--quant_policy 4] [--out b3.json]
    python benchmark/profile_throughput.py synthetic ./workspace --concurrency 256 --num_prompts 3000

DATASET is a ShareGPT JSON file, or `synthetic` for the seeded synthetic set of BENCHMARKS.md
(prompt 4..1024 tokens, prompt + output <= 2048, mean about 250 in / 230 out, random ids).
ShareGPT sampling is v0.0.2's: the first human/assistant pair of each conversation with >= 2
turns, both tokenized; pairs with a side < 4 tokens, a prompt > 1024 or a sum > 2048 dropped;
then `--num_prompts` drawn, seeded here (v0.0.2 did not seed).

`--concurrency` threads, each with its own instance and session id, pull requests from a shared
queue; every request runs `stream_infer(..., request_output_len=<completion length>,
temperature=1.0, top_p=1.0, top_k=40, ignore_eos=True)` with a seed per request, so a run is
reproducible. Printed (and written with --out): v0.0.2's four throughput lines (req/s, req/min,
prompt+completion tok/s, output tok/s) and TTFT, per-token latency (inter-token gaps) and
end-to-end latency, p50/p99.

Like v0.0.2, a client waits for the whole reply (one wake-up per request); token times come
from the engine, which stamps the moment each step hands its tokens over (`StreamOutput.stamps`).
`--stream_output` makes every client thread wake up per step instead and time the tokens
itself (hundreds of Python threads waking every step: that costs the engine time too).
`--engine_timing` prints the engine loop's host time per step by phase (`step_timer.py`),
split into decode-only steps (CUDA graphs) and mixed ones (prefill chunks too).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import sys
import threading
import time
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

Pair = Tuple[List[int], int]  # (prompt ids, completion length)


def percentile(values, q):
    if not values:
        return float('nan')
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def sample_sharegpt(path: str, tokenizer, num_prompts: int, seed: int,
                    max_seq_len: int = 2048) -> List[Pair]:
    with open(path) as f:
        dataset = json.load(f)
    pairs = [(d['conversations'][0]['value'], d['conversations'][1]['value'])
             for d in dataset if len(d.get('conversations', ())) >= 2]
    rng = random.Random(seed)
    rng.shuffle(pairs)  # tokenize only what is needed, in a seeded order
    out = []
    for prompt, completion in pairs:
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
        if len(p) < 4 or len(c) < 4 or len(p) > 1024 or len(p) + len(c) > max_seq_len:
            continue
        out.append((p, len(c)))
        if len(out) == num_prompts:
            break
    if len(out) < num_prompts:
        print(f'warning: only {len(out)} pairs pass the filter', file=sys.stderr)
    return out


def sample_synthetic(num_prompts: int, vocab_size: int, seed: int,
                     max_seq_len: int = 2048) -> List[Pair]:
    """Lengths from log-normal laws fitted to ShareGPT's filtered pairs (mean ~250 / ~230),
    rejected outside prompt 4..1024, output >= 4, prompt + output <= max_seq_len."""
    rng = random.Random(seed)
    out = []
    while len(out) < num_prompts:
        n_in = int(rng.lognormvariate(math.log(200), 0.95))
        n_out = int(rng.lognormvariate(math.log(146), 1.0))
        if not 4 <= n_in <= 1024 or n_out < 4 or n_in + n_out > max_seq_len:
            continue
        ids = [rng.randrange(3, vocab_size) for _ in range(n_in)]
        out.append((ids, n_out))
    return out


def load_requests(args, tokenizer, vocab_size: int, session_len: int) -> List[Pair]:
    max_seq_len = min(2048, session_len - 1)
    if args.dataset == 'synthetic':
        return sample_synthetic(args.num_prompts, vocab_size, args.seed, max_seq_len)
    return sample_sharegpt(args.dataset, tokenizer, args.num_prompts, args.seed, max_seq_len)


def run(tm, requests: List[Pair], concurrency: int, seed: int, progress: bool = True,
        stream_output: bool = False, time_limit: float = 0.0):
    """Returns (results of the requests that ran, in order, elapsed, errors). With
    `time_limit` > 0 no request starts after that many seconds (the ones running finish)."""
    q: queue.Queue = queue.Queue()
    for i, r in enumerate(requests):
        q.put((i, r))
    results = [None] * len(requests)
    errors = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc='requests', unit='req', dynamic_ncols=True)
        except ImportError:
            pass
    lock = threading.Lock()

    def worker(tid: int):
        instance = tm.create_instance()
        while True:
            if time_limit and time.perf_counter() - start > time_limit:
                return
            try:
                i, (ids, n_out) = q.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            stamps, seen = [], 0  # (time, new tokens) per arrival
            try:
                for outputs in instance.stream_infer(
                        tid + 1, ids, request_output_len=n_out, sequence_start=True,
                        sequence_end=True, temperature=1.0, top_p=1.0, top_k=40,
                        ignore_eos=True, random_seed=seed + i, stream_output=stream_output):
                    n = outputs[0][1]
                    if stream_output and n > seen:
                        stamps.append((time.perf_counter(), n - seen))
                        seen = n
                    elif outputs[0].finish_reason:  # the engine's stamps: (time, tokens so far)
                        for t, total in outputs[0].stamps:
                            stamps.append((t, total - seen))
                            seen = total
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f'request {i}: {type(e).__name__}: {e}')
            results[i] = (t0, stamps, len(ids), seen)
            if bar is not None:
                with lock:
                    bar.update(1)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True)
               for t in range(concurrency)]
    start = time.perf_counter()  # read by the workers
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return [r for r in results if r is not None], elapsed, errors


def summarize(results, elapsed):
    ttft, itl, tpot, e2e = [], [], [], []
    prompt_tokens = output_tokens = 0
    for t0, stamps, n_in, n_out in results:
        prompt_tokens += n_in
        output_tokens += n_out
        if not stamps:
            continue
        ttft.append(stamps[0][0] - t0)
        e2e.append(stamps[-1][0] - t0)
        prev = stamps[0][0]
        for t, k in stamps[1:]:
            itl.extend([(t - prev) / k] * k)
            prev = t
        if n_out > 1:
            tpot.append((stamps[-1][0] - stamps[0][0]) / (n_out - stamps[0][1]))
    n = len(results)
    ms = 1000.0
    return {
        'requests': n, 'elapsed_s': elapsed,
        'throughput_req_s': n / elapsed, 'throughput_req_min': n / elapsed * 60,
        'throughput_tok_s': (prompt_tokens + output_tokens) / elapsed,
        'throughput_out_tok_s': output_tokens / elapsed,
        'prompt_tokens': prompt_tokens, 'output_tokens': output_tokens,
        'mean_prompt_len': prompt_tokens / max(1, n), 'mean_output_len': output_tokens / max(1, n),
        'ttft_ms_p50': percentile(ttft, 50) * ms, 'ttft_ms_p99': percentile(ttft, 99) * ms,
        'tpot_ms_p50': percentile(tpot, 50) * ms, 'tpot_ms_p99': percentile(tpot, 99) * ms,
        'itl_ms_p50': percentile(itl, 50) * ms, 'itl_ms_p99': percentile(itl, 99) * ms,
        'e2e_s_p50': percentile(e2e, 50), 'e2e_s_p99': percentile(e2e, 99),
    }


def print_table(s, args, device):
    print(f'\nconcurrency: {args.concurrency}, prompts: {s["requests"]}, dataset: {args.dataset}, '
          f'mean in/out: {s["mean_prompt_len"]:.0f}/{s["mean_output_len"]:.0f}, '
          f'quant_policy: {args.quant_policy}, device: {device}')
    if s['requests'] < args.num_prompts:
        print(f'time limit {args.time_limit:g}s: {s["requests"]} of {args.num_prompts} '
              'requests ran')
    print(f'elapsed_time: {s["elapsed_s"]:.2f}s')
    print(f'Throughput requests: {s["throughput_req_s"]:.3f} req/s')
    print(f'Throughput requests: {s["throughput_req_min"]:.2f} req/min')
    print(f'Throughput tokens: {s["throughput_tok_s"]:.2f} tokens/s')
    print(f'Throughput tokens(output only): {s["throughput_out_tok_s"]:.2f} tokens/s')
    rows = [('TTFT (ms)', s['ttft_ms_p50'], s['ttft_ms_p99']),
            ('per-token latency, ITL (ms)', s['itl_ms_p50'], s['itl_ms_p99']),
            ('per-request TPOT (ms)', s['tpot_ms_p50'], s['tpot_ms_p99']),
            ('end to end (s)', s['e2e_s_p50'], s['e2e_s_p99'])]
    print(f'\n| {"metric":<28} | {"p50":>10} | {"p99":>10} |')
    print(f'|{"-" * 30}|{"-" * 12}|{"-" * 12}|')
    for name, p50, p99 in rows:
        print(f'| {name:<28} | {p50:>10.2f} | {p99:>10.2f} |')


def print_timing(r: dict):
    print(f'\nengine loop, host time per step ({r["steps"]} steps, '
          f'{r["rows_per_step"]:.0f} rows per step): {r["step_us"] / 1000:.2f} ms wall, '
          f'{r["cpu_us"] / 1000:.2f} ms CPU of the engine thread')
    print(f'  decode-only steps: {r["decode_steps"]}, {r["decode_step_us"] / 1000:.2f} ms each; '
          f'mixed steps: {r["mixed_steps"]}, {r["mixed_step_us"] / 1000:.2f} ms each')
    phases = [k[:-3] for k in r if k.endswith('_us') and k not in (
        'step_us', 'cpu_us', 'decode_step_us', 'mixed_step_us')]
    print('  ' + ', '.join(f'{p} {r[p + "_us"] / 1000:.2f}' for p in phases) + ' (ms)')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('dataset', help="ShareGPT JSON file, or 'synthetic'")
    p.add_argument('model_path', nargs='?', default=None, help='a deployed workspace')
    p.add_argument('--tp', type=int, default=1,
                   help='tensor-parallel ranks (one process per GPU; default 1)')
    p.add_argument('--dummy', default=None, metavar='SHAPE',
                   help='random weights created on the device for a model shape (llama2-7b, '
                        'llama3-8b, llama2-13b; tiny on CPU) instead of a workspace; needs the '
                        'synthetic dataset (there is no tokenizer)')
    p.add_argument('--concurrency', type=int, default=256, help='client threads (default 256)')
    p.add_argument('--num_prompts', type=int, default=3000, help='requests (default 3000)')
    p.add_argument('--quant_policy', type=int, default=0, choices=(0, 4), help='4: int8 KV')
    p.add_argument('--kv_int8_scales', default=None, choices=('per_tensor', 'per_head', 'online'),
                   help='int8 KV scales (default: the config\'s, per_tensor)')
    p.add_argument('--seed', type=int, default=0, help='dataset and sampling seed')
    p.add_argument('--max_batch_size', type=int, default=None, help='engine override')
    p.add_argument('--cache_max_entry_count', type=float, default=None, help='engine override')
    p.add_argument('--session_len', type=int, default=None, help='engine override')
    p.add_argument('--stream_output', action='store_true',
                   help='every client thread streams (wakes per engine step) and times the '
                        'tokens itself; default: one wake-up per request as in v0.0.2, token '
                        'times stamped by the engine')
    p.add_argument('--engine_timing', action='store_true',
                   help="print the engine loop's host time per step by phase (decode-only vs "
                        'mixed steps)')
    p.add_argument('--time_limit', type=float, default=0.0, metavar='S',
                   help='start no request after S seconds (0: no limit); the ones running '
                        'finish and the report counts only what ran')
    p.add_argument('--warmup', type=int, default=0,
                   help='requests run (and discarded) before the measured run')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    p.add_argument('--out', default=None, help='write the results as JSON')
    args = p.parse_args(argv)
    if (args.model_path is None) == (args.dummy is None):
        p.error('give a workspace path or --dummy SHAPE (one of them)')
    if args.dummy is not None and args.dataset != 'synthetic':
        p.error('--dummy has no tokenizer: use the synthetic dataset')
    if args.concurrency < 1 or args.num_prompts < 1:
        p.error('--concurrency and --num_prompts must be >= 1')
    if args.time_limit < 0:
        p.error('--time_limit must be >= 0')
    return args


def main(argv=None):
    args = parse_args(argv)
    from lmdeploy.turbomind import TurboMind
    overrides = {k: getattr(args, k) for k in ('max_batch_size', 'cache_max_entry_count',
                                               'session_len') if getattr(args, k) is not None}
    if args.quant_policy:
        overrides['quant_policy'] = args.quant_policy
    if args.kv_int8_scales:
        overrides['kv_int8_scales'] = args.kv_int8_scales
    tm = TurboMind(args.model_path, dummy=args.dummy, tp=args.tp, **overrides)
    try:
        requests = load_requests(args, tm.tokenizer, tm.config.vocab_size, tm.session_len)
        if args.warmup:
            run(tm, requests[:args.warmup], min(args.concurrency, args.warmup), args.seed,
                progress=False)
        timer = None
        if args.engine_timing:
            from lmdeploy.turbomind.step_timer import StepTimer
            tm.engine.timer = timer = StepTimer()
        results, elapsed, errors = run(tm, requests, args.concurrency, args.seed,
                                       progress=not args.no_progress,
                                       stream_output=args.stream_output,
                                       time_limit=args.time_limit)
        summary = summarize(results, elapsed)
        if timer is not None:
            summary['engine_timing'] = tm.engine.call(timer.report)
            tm.engine.timer = None
        graphs = getattr(tm.engine.runner, 'graphs', None)
        if graphs is not None:
            summary['graph_replays'] = dict(decode=graphs.replays, prompt=graphs.prompt_replays,
                                            mixed=graphs.mixed_replays)
            print(f"CUDA graph replays: {summary['graph_replays']}")
        device = f'{tm.config.device} ({tm.config.dtype})'
        print_table(summary, args, device)
        if timer is not None:
            print_timing(summary['engine_timing'])
        if errors:
            print(f'\n{len(errors)} requests failed, first: {errors[0]}', file=sys.stderr)
        if args.out:
            with open(args.out, 'w') as f:
                json.dump({'args': vars(args), 'device': device, 'errors': errors[:20],
                           **summary}, f, indent=1)
        return 1 if errors else 0
    finally:
        tm.close()


if __name__ == '__main__':
    sys.exit(main())
