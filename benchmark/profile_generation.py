"""Static-batch generation benchmark (LMDeploy v0.0.2's profile_generation, section 11.1, with
streaming so first-token latency is real).

    python benchmark/profile_generation.py ./workspace --concurrency 8 --input_seqlen 0 \
        --output_seqlen 2048                                        # v0.0.2's arguments
    python benchmark/profile_generation.py --dummy llama2-7b --grid B1 --compare hf \
        --out b1.json                                               # BENCHMARKS.md B1
    python benchmark/profile_generation.py --dummy llama2-7b --rows 64:1:128,64:128:128
    python benchmark/profile_generation.py --dummy llama2-7b --rows max:128:2048 \
        --quant_policy 4 --kv_int8_scales online                    # B2 int8 KV, max batch

Each row (concurrency C, input I, output O) submits C requests of I prompt tokens together
(greedy, ignore_eos, O new tokens each), `--test_round` times, and measures per request the
time to first token (TTFT, from submission) and the gaps between its streamed tokens
(per-token latency), and per round the output tokens/s (C * O / round time). Medians over
rounds; p50/p99 over all requests' samples. Prompts are seeded random ids (a workspace's
prompt ids are random too: speed does not depend on them). I = 0 means one token (the BOS).

``--compare hf`` (dummy shapes): transformers' LlamaForCausalLM on the SAME weights (views of
the engine's tensors) in the same process, fp16, `generate` greedy with min_new_tokens =
max_new_tokens (ignore-eos), at batch 1 for each bs1 row's prompt length with ``--hf_output_seqlen``
new tokens, and at batch 64 for the B2 rows at concurrency 64 whose prompts fit HF_MAX_TOKENS
(transformers' cache is not paged); the engine's tok/s for that same shape is measured beside
it and the ratio printed.
``--trace``: a bs1 decode step's CUDA-graph replay time and a torch-profiler kernel table of
the same step run eagerly (where the time goes).

Prints a table and writes JSON (``--out``).
"""
import argparse
import itertools
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lmdeploy.turbomind.kernels import compiled_variants  # noqa: E402

B1_PAIRS = [(1, 128), (128, 2048), (2048, 128)]
B2_CONCURRENCY = [1, 16, 32, 64, 128]
B2_PAIRS = [(1, 128), (128, 128), (128, 2048), (2048, 128), (2048, 2048)]

_session_ids = itertools.count(1)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        class _Bar:
            n = 0

            def update(self, k=1):
                self.n += k
                print(f'{desc}: {self.n}/{total}', file=sys.stderr)

            def close(self):
                pass
        return _Bar()


MAX_BATCH = 0  # a row's concurrency 'max': as many sessions of the row as the KV pool holds
MAX_BATCH_LIMIT = 128  # max_batch_size for 'max' rows when --max_batch_size is not given
HF_MAX_TOKENS = 64 * 256  # --compare hf: batch x (prompt + new tokens) transformers runs at most


def max_concurrency(tm, i: int, o: int) -> int:
    """Sessions of i + o tokens that fit in the KV pool at once (at most max_batch_size)."""
    cfg = tm.config
    per_session = -(-(max(i, 1) + o) // cfg.block_size)
    return max(1, min(cfg.max_batch_size, tm.engine.runner.num_blocks // per_session))


def parse_rows(args) -> List[tuple]:
    if args.rows:
        rows = []
        for item in args.rows.split(','):
            c, i, o = item.split(':')
            c, i, o = (MAX_BATCH if c == 'max' else int(c)), int(i), int(o)
            rows.append((c, i, o))
        return rows
    if args.grid == 'B1':
        return [(1, i, o) for i, o in B1_PAIRS]
    if args.grid == 'B2':
        conc = [int(c) for c in args.grid_concurrency.split(',')] if args.grid_concurrency \
            else B2_CONCURRENCY
        return [(c, i, o) for c in conc for i, o in B2_PAIRS]
    return [(args.concurrency, args.input_seqlen, args.output_seqlen)]


def make_prompts(n: int, length: int, vocab: int, start_id: int, seed: int) -> List[List[int]]:
    g = np.random.default_rng(seed)
    if length <= 0:
        return [[start_id] for _ in range(n)]
    return [[start_id] + g.integers(3, vocab, size=length - 1).tolist() for _ in range(n)]


def run_round(tm, prompts: List[List[int]], output_len: int, bar=None) -> dict:
    """Submit all prompts at once, stream, and time every token's arrival."""
    inst = tm.create_instance()
    n = len(prompts)
    sessions = [next(_session_ids) for _ in range(n)]
    t0 = time.perf_counter()
    reqs = inst._submit(prompts, sessions, output_len, True, True, [1] * n, 1.0, 1, 1.0, 1.0,
                        True, [None] * n, None, None)
    cond = reqs[0].cond
    counts = [0] * n
    stamps = [[] for _ in range(n)]
    seen = -1
    while True:
        with cond:
            cond.wait_for(lambda: sum(r.version for r in reqs) != seen)
            seen = sum(r.version for r in reqs)
            now = time.perf_counter()
            for i, r in enumerate(reqs):
                k = len(r.output_ids)
                if k > counts[i]:
                    stamps[i].extend([now] * (k - counts[i]))
                    if bar is not None and i == 0:
                        bar.update(k - counts[i])
                    counts[i] = k
            done = all(r.finished for r in reqs)
            error = next((r.error for r in reqs if r.error is not None), None)
        if error is not None:
            raise error
        if done:
            break
    t1 = time.perf_counter()
    ttft = [s[0] - t0 for s in stamps if s]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    total = sum(counts)
    return dict(t0=t0, elapsed=t1 - t0, ttft=ttft, gaps=gaps, tokens=total,
                out_tok_s=total / (t1 - t0), first=[s[0] - t0 for s in stamps if s],
                last=[s[-1] - t0 for s in stamps if s])


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float('nan')


def profile_row(tm, c: int, i: int, o: int, rounds: int, warmup: bool, seed: int,
                engine_timing: bool = False) -> dict:
    cfg = tm.config
    if warmup:  # compile the prefill/decode shapes of this row
        run_round(tm, make_prompts(c, i, cfg.vocab_size, cfg.start_id, seed + 99), min(o, 4))
    compiles = compiled_variants()
    timer = None
    if engine_timing:
        from lmdeploy.turbomind.step_timer import StepTimer
        tm.engine.timer = timer = StepTimer()
    results = []
    bar = _progress(rounds * o, f'bs{c} {i}->{o}')
    for r in range(rounds):
        prompts = make_prompts(c, i, cfg.vocab_size, cfg.start_id, seed + r)
        results.append(run_round(tm, prompts, o, bar))
    bar.close()
    if timer is not None:
        timing = tm.engine.call(timer.report)
        tm.engine.timer = None
    ttft = [x for res in results for x in res['ttft']]
    gaps = [x for res in results for x in res['gaps']]
    row = dict(concurrency=c, input_seqlen=i, output_seqlen=o, rounds=rounds,
               out_tok_s=float(np.median([res['out_tok_s'] for res in results])),
               elapsed_s=float(np.median([res['elapsed'] for res in results])),
               ttft_ms_p50=_pct(ttft, 50) * 1e3, ttft_ms_p99=_pct(ttft, 99) * 1e3,
               ttft_ms_mean=float(np.mean(ttft)) * 1e3 if ttft else float('nan'),
               tok_ms_p50=_pct(gaps, 50) * 1e3, tok_ms_p99=_pct(gaps, 99) * 1e3,
               tok_ms_mean=float(np.mean(gaps)) * 1e3 if gaps else float('nan'))
    # v0.0.2's summary lines (with real first-token latency)
    print(f'concurrency: {c}, input_tokens: {i}, output_tokens: {o}\n'
          f'elapsed_time: {row["elapsed_s"]:.2f}s\n'
          f'first_token latency(min, max, ave): {min(ttft):.3f}s, {max(ttft):.3f}s, '
          f'{np.mean(ttft):.3f}s\n'
          f'token latency(min, max, ave): {min(gaps, default=0):.4f}s, '
          f'{max(gaps, default=0):.4f}s, {np.mean(gaps) if gaps else 0:.4f}s\n'
          f'throughput: {row["out_tok_s"]:.2f} token/s', flush=True)
    if compiles >= 0:  # Triton compiles inside the timed rounds (the warm-up should do them)
        row['triton_compiles'] = compiled_variants() - compiles
        if row['triton_compiles']:
            print(f"{row['triton_compiles']} Triton kernel variant(s) compiled during the timed "
                  'rounds', flush=True)
    if timer is not None:
        row['engine_timing'] = timing
        print('engine_timing: ' + ', '.join(
            f'{k} {v:.3f}' if isinstance(v, float) and '_ms_' in k else
            f'{k} {v:.0f}' if isinstance(v, float) else f'{k} {v}' for k, v in timing.items()),
            flush=True)
    if torch.cuda.is_available() and tm.config.device.startswith('cuda'):
        row['gpu_mem_max_alloc_gib'] = torch.cuda.max_memory_allocated() / 2**30
        # > 0: the caching allocator ran out, freed its cache and retried (slow, syncs)
        row['alloc_retries'] = torch.cuda.memory_stats().get('num_alloc_retries', 0)
        free, total = torch.cuda.mem_get_info()
        row['gpu_mem_used_gib'] = (total - free) / 2**30
    return row


def compare_hf(tm, c: int, i: int, o: int, seed: int, engine_rounds: int = 1) -> dict:
    """transformers on the same weights at batch c (c prompts of i tokens, no padding needed):
    (i -> o) greedy, ignore-eos; ratio of output tok/s vs ours on the same prompts."""
    from lmdeploy.turbomind.dummy import hf_model
    runner = tm.engine.runner
    model = hf_model(tm.config, runner.weights)
    model.generation_config.eos_token_id = None
    cfg = tm.config
    prompts = make_prompts(c, i, cfg.vocab_size, cfg.start_id, seed + 7)
    prompt = prompts[0]
    ours = [run_round(tm, prompts, o) for _ in range(max(1, engine_rounds))]
    ours_tok_s = float(np.median([r['out_tok_s'] for r in ours]))
    ids = torch.tensor(prompts, device=runner.device)
    sync = torch.cuda.synchronize if runner.device.type == 'cuda' else (lambda: None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=o, min_new_tokens=o, do_sample=False)
        sync()
        t1 = time.perf_counter()
    hf_tokens = out[0, len(prompt):].tolist()
    hf_tok_s = c * len(hf_tokens) / (t1 - t0)
    # our tokens for the same prompt (greedy) to report agreement
    inst = tm.create_instance()
    got = None
    for got in inst.stream_infer(next(_session_ids), prompt, request_output_len=o, top_k=1,
                                 sequence_start=True, sequence_end=True, ignore_eos=True):
        pass
    ours_tokens = got[0][0].tolist()
    prefix = next((k for k, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b),
                  min(len(ours_tokens), len(hf_tokens)))
    del model
    return dict(concurrency=c, input_seqlen=i, output_seqlen=o, hf_out_tok_s=hf_tok_s,
                ours_out_tok_s=ours_tok_s, ratio=ours_tok_s / hf_tok_s,
                greedy_common_prefix=prefix)


def trace_decode(tm, kv_len: int, out_dir: Optional[str]) -> dict:
    """bs1 decode step at context kv_len: graph replay time, and an eager kernel table."""
    from lmdeploy.turbomind.step_input import RowPlan, build_step_input
    runner = tm.engine.runner
    cfg = tm.config
    kv_len = min(kv_len, cfg.session_len)
    blocks = list(range(min(runner.num_blocks, cfg.blocks_per_session())))
    kv_len = min(kv_len, len(blocks) * cfg.block_size)

    def step_on(device):
        s = build_step_input([RowPlan([5], kv_len - 1, blocks)], cfg.block_size)
        s.slot_mapping.fill_(-1)  # write nothing into the pool
        return s.to(device)

    def call():  # on the engine thread, between steps
        res = {}
        host = step_on('cpu')
        if runner.graphs is not None:
            for _ in range(5):
                runner.run(host)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(True), torch.cuda.Event(True)
            times = []
            for _ in range(30):
                start.record()
                runner.run(host)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            res['graph_step_ms_p50'] = float(np.median(times))
            t0 = time.perf_counter()
            for _ in range(30):
                runner.run(host)
            torch.cuda.synchronize()
            res['graph_step_wall_ms'] = (time.perf_counter() - t0) / 30 * 1e3
        dev = step_on(runner.device)
        dev.max_kv_len = cfg.session_len
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode():
            for _ in range(3):
                runner.model.forward(dev, runner.kv_cache)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    runner.model.forward(dev, runner.kv_cache)
                torch.cuda.synchronize()
        ka = prof.key_averages()
        res['eager_kernel_table'] = ka.table(sort_by='self_device_time_total', row_limit=16,
                                             max_name_column_width=70)
        total_us = sum(e.self_device_time_total for e in ka) / 5
        res['eager_kernel_sum_ms_per_step'] = total_us / 1e3
        if out_dir:
            prof.export_chrome_trace(os.path.join(out_dir, 'decode_trace.json'))
        return res

    return tm.engine.call(call)


def print_table(rows, compares):
    head = ('bs', 'in', 'out', 'rnd', 'TTFT p50 ms', 'TTFT p99 ms', 'tok p50 ms', 'tok p99 ms',
            'out tok/s', 'mem GiB')
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    for r in rows:
        print(f"| {r['concurrency']} | {r['input_seqlen']} | {r['output_seqlen']} | "
              f"{r['rounds']} | {r['ttft_ms_p50']:.2f} | {r['ttft_ms_p99']:.2f} | "
              f"{r['tok_ms_p50']:.3f} | {r['tok_ms_p99']:.3f} | {r['out_tok_s']:.1f} | "
              f"{r.get('gpu_mem_used_gib', float('nan')):.1f} |")
    for c in compares:
        print(f"vs transformers (bs{c['concurrency']}, {c['input_seqlen']}->{c['output_seqlen']}): ours "
              f"{c['ours_out_tok_s']:.1f} tok/s, hf {c['hf_out_tok_s']:.1f} tok/s, ratio "
              f"{c['ratio']:.1f}x, greedy common prefix {c['greedy_common_prefix']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('model_path', nargs='?', default=None, help='workspace (or use --dummy)')
    p.add_argument('--concurrency', type=int, default=1,
                   help='requests submitted together in a row (default: %(default)s)')
    p.add_argument('--input_seqlen', type=int, default=0,
                   help='prompt tokens per request; 0 = one token, the BOS (default: %(default)s)')
    p.add_argument('--output_seqlen', type=int, default=512,
                   help='new tokens per request, EOS ignored (default: %(default)s)')
    p.add_argument('--test_round', type=int, default=10,
                   help='timed rounds per row; medians over rounds (default: %(default)s)')
    p.add_argument('--tp', type=int, default=1,
                   help='tensor-parallel ranks (one process per GPU; default 1)')
    p.add_argument('--dummy', default=None, help='random weights of a named shape: '
                   'llama2-7b | llama3-8b | llama2-13b | tiny')
    p.add_argument('--grid', choices=['B1', 'B2'], default=None,
                   help="BENCHMARKS.md's rows instead of --concurrency/--input_seqlen/"
                        '--output_seqlen: B1 (bs1 latency) or B2 (the static grid)')
    p.add_argument('--grid_concurrency', default=None, help='B2 concurrencies, e.g. 1,64')
    p.add_argument('--rows', default=None, help='explicit rows C:IN:OUT,C:IN:OUT,...; C = max: '
                   'as many concurrent sessions as the KV pool holds (up to --max_batch_size, '
                   f'default {MAX_BATCH_LIMIT} for such rows)')
    p.add_argument('--compare', choices=['hf'], default=None,
                   help='hf: also run transformers on the same weights in this process and print '
                        'the ratio (dummy shapes; see above)')
    p.add_argument('--hf_output_seqlen', type=int, default=64,
                   help='new tokens per transformers run of --compare hf (default: %(default)s)')
    p.add_argument('--trace', action='store_true', help='bs1 decode-step timing + kernel table')
    p.add_argument('--out', default=None, help='JSON results file')
    p.add_argument('--device', default=None,
                   help="'cuda', 'cuda:N' or 'cpu' (default: cuda when available)")
    p.add_argument('--dtype', default=None, choices=('fp16', 'bf16', 'fp32'),
                   help='compute dtype (default: fp16 on GPU, fp32 on CPU)')
    p.add_argument('--session_len', type=int, default=None,
                   help='context length per session (default: the config, raised to fit the '
                        'longest row)')
    p.add_argument('--max_batch_size', type=int, default=None,
                   help='persistent batch size (default: the largest concurrency asked for; '
                        f'{MAX_BATCH_LIMIT} for max rows)')
    p.add_argument('--max_prefill_tokens', type=int, default=None,
                   help="token budget of one step's prefill chunks (default: 8192)")
    p.add_argument('--cache_max_entry_count', type=float, default=None,
                   help='KV pool: <= 1 fraction of free memory, > 1 number of sessions '
                        '(default: 0.9; 0.6 with --compare hf, which needs room for transformers)')
    p.add_argument('--block_size', type=int, default=None,
                   help='tokens per KV block (default: 64)')
    p.add_argument('--no_cuda_graph', action='store_true',
                   help='run every step eagerly (no CUDA graphs), e.g. to compare')
    p.add_argument('--jit_schedule', action=argparse.BooleanOptionalAction, default=None,
                   help='plan each step just before the one on the device ends (the engine '
                        "config's jit_schedule, on by default; --no-jit_schedule: as soon as "
                        'it is launched)')
    p.add_argument('--quant_policy', type=int, default=None, choices=(0, 4),
                   help='4: int8 KV cache (default: the config, 0 for --dummy)')
    p.add_argument('--kv_int8_scales', default=None, choices=('per_tensor', 'per_head', 'online'),
                   help='int8 KV scales: calibrated files (per_tensor / per_head; --dummy uses '
                        'synthetic ones) or online (per token, no files)')
    p.add_argument('--engine_timing', action='store_true',
                   help="time the engine loop's steps by phase during each row's timed rounds "
                        '(host wall time per step, decode-only and mixed steps apart; '
                        'lmdeploy/turbomind/step_timer.py) and print it')
    p.add_argument('--no_warmup', action='store_true',
                   help='skip the untimed warm-up round of each row')
    p.add_argument('--seed', type=int, default=0,
                   help='seed of the random prompt ids (default: %(default)s)')
    args = p.parse_args(argv)
    if not args.model_path and not args.dummy:
        p.error('give a workspace path or --dummy SHAPE')

    from lmdeploy.turbomind import TurboMind
    rows = parse_rows(args)
    max_c = max(c for c, _, _ in rows)
    need_len = max(max(i, 1) + o for _, i, o in rows) + 8
    overrides = dict(device=args.device, dtype=args.dtype, block_size=args.block_size,
                     max_batch_size=args.max_batch_size or (
                         MAX_BATCH_LIMIT if any(c == MAX_BATCH for c, _, _ in rows)
                         else max(max_c, 1)),
                     max_prefill_tokens=args.max_prefill_tokens,
                     cache_max_entry_count=args.cache_max_entry_count,
                     session_len=args.session_len or need_len)
    if args.no_cuda_graph:
        overrides['cuda_graph'] = False
    if args.jit_schedule is not None:
        overrides['jit_schedule'] = args.jit_schedule
    overrides.update(quant_policy=args.quant_policy, kv_int8_scales=args.kv_int8_scales)
    if args.cache_max_entry_count is None:
        overrides['cache_max_entry_count'] = 0.6 if args.compare else 0.9
    if args.max_prefill_tokens is None:
        overrides['max_prefill_tokens'] = 8192
    t0 = time.perf_counter()
    tm = TurboMind(args.model_path, dummy=args.dummy, tp=args.tp, **overrides)
    build_s = time.perf_counter() - t0
    runner = tm.engine.runner
    print(f'engine built in {build_s:.1f}s: {runner.kv_cache}, kernels {runner.kernels}, '
          f'graphs {runner.graphs.buckets if runner.graphs else None}, memory '
          f'{ {k: round(v / 2**30, 3) for k, v in runner.memory.items()} } GiB', flush=True)
    results = dict(args=vars(args), config=str(tm.config), build_s=build_s,
                   memory=runner.memory, rows=[], compare=[],
                   kv_tokens=runner.num_blocks * tm.config.block_size,
                   sessions_2048=runner.num_blocks // -(-2048 // tm.config.block_size))
    print(f'KV pool: {results["kv_tokens"]} tokens = {results["sessions_2048"]} concurrent '
          '2048-token sessions', flush=True)
    if torch.cuda.is_available() and runner.device.type == 'cuda':
        results['gpu'] = torch.cuda.get_device_name(runner.device)
    try:
        for c, i, o in rows:
            if c == MAX_BATCH:
                c = max_concurrency(tm, i, o)
                print(f'max batch for {i}/{o}: {c} sessions', flush=True)
            results['rows'].append(profile_row(tm, c, i, o, args.test_round,
                                               not args.no_warmup, args.seed,
                                               args.engine_timing))
        if args.compare == 'hf':
            if not args.dummy:
                raise SystemExit('--compare hf needs --dummy (the weights must be in memory)')
            shapes = sorted({(c, i, min(o, args.hf_output_seqlen)) for c, i, o in rows
                             if c in (1, 64) and c * (i + o) <= HF_MAX_TOKENS})
            for c, i, o in shapes or [(1, 1, args.hf_output_seqlen)]:
                try:
                    results['compare'].append(compare_hf(tm, c, i, o, args.seed))
                except Exception as e:  # noqa: BLE001 - the table still prints
                    print(f'compare hf failed: {e!r}')
        if args.trace and runner.device.type == 'cuda':
            out_dir = os.path.dirname(args.out) if args.out else None
            for kv in (128, 2048):
                try:
                    tr = trace_decode(tm, kv, out_dir)
                except Exception as e:  # noqa: BLE001 - the table still prints
                    print(f'trace failed: {e!r}')
                    continue
                results.setdefault('trace', {})[kv] = tr
                print(f"bs1 decode at ctx {kv}: graph replay {tr.get('graph_step_ms_p50', 0):.3f}"
                      f" ms (wall {tr.get('graph_step_wall_ms', 0):.3f} ms), eager kernels sum "
                      f"{tr['eager_kernel_sum_ms_per_step']:.3f} ms/step")
                print(tr['eager_kernel_table'])
    finally:
        tm.close()
    print_table(results['rows'], results['compare'])
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == '__main__':
    main()
