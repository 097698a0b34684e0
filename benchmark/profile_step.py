"""Time one engine step of a chosen shape and show where its device time goes.

    python3 benchmark/profile_step.py --dummy llama2-7b --decode 146:500 --prompts 205,205
    python3 benchmark/profile_step.py --dummy llama2-7b --decode 1:1100          # B1's step
    python3 benchmark/profile_step.py --cases '146:500/205,205;146:500/;1:1100/'  # one runner

A step of `--decode N:CTX` decode rows (N rows, each over CTX cached tokens) followed by the
`--prompts` rows (new prompts of those lengths; `LEN@CACHED` for a chunk over a cached prefix)
is built over distinct pool blocks; nothing is written into the pool (slots -1), the KV read is
whatever the pool holds, which costs the same. Reported: the step through `ModelRunner.run`
(the CUDA graph it replays, or eager when none fits), the eager forward, both device time by
CUDA events (median of --iters), and a torch-profiler table of the eager forward's kernels
grouped by name, with each group's share of the step, and the device's idle time inside one
eager forward with its largest gaps (the device waiting for the host). Also FLOPs and bytes of
the step's GEMMs and KV reads, and what they would take at the H100's ~600 TFLOP/s and ~3.0
TB/s.

Prints tables and writes JSON (--out).
"""
import argparse
import json
import time

import numpy as np
import torch

H100_TFLOPS = 600.0  # dense fp16 GEMMs at these shapes, measured order of magnitude
H100_TBS = 3.0  # device-to-device copy


def parse_rows(decode: str, prompts: str):
    rows = []  # (num_cached, q_len)
    if decode:
        n, ctx = (int(x) for x in decode.split(':'))
        rows += [(ctx, 1)] * n
    for p in filter(None, (prompts or '').split(',')):
        q, _, cached = p.partition('@')
        rows.append((int(cached or 0), int(q)))
    return rows


def build_step(rows, cfg, num_blocks, seed=0):
    from lmdeploy.turbomind.step_input import RowPlan, build_step_input
    g = np.random.default_rng(seed)
    bs = cfg.block_size
    need = [-(-(c + q) // bs) for c, q in rows]
    if sum(need) > num_blocks:
        raise SystemExit(f'the step needs {sum(need)} blocks, the pool has {num_blocks}')
    perm = g.permutation(num_blocks).tolist()
    plans, at = [], 0
    for (cached, q), nb in zip(rows, need):
        ids = g.integers(3, cfg.vocab_size, q).tolist()
        plans.append(RowPlan(ids, cached, perm[at:at + nb]))
        at += nb
    step = build_step_input(plans, bs)
    step.slot_mapping.fill_(-1)
    return step


def device_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def step_cost(rows, cfg, tp=1):
    """GEMM FLOPs, weight bytes and KV bytes read of the step (Llama shapes)."""
    T = sum(q for _, q in rows)
    H = cfg.hidden_size
    per_tok = 2 * (H * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * H + 3 * H * cfg.inter_size)
    flops = T * per_tok * cfg.num_layer / tp + 2 * len(rows) * H * cfg.vocab_size
    weights = (per_tok // 2 * cfg.num_layer / tp + H * cfg.vocab_size) * 2
    kv = sum(c + q for c, q in rows) * 2 * cfg.kv_dim * cfg.num_layer * 2 / tp
    return dict(tokens=T, gemm_tflop=flops / 1e12, weight_gb=weights / 1e9, kv_gb=kv / 1e9,
                gemm_ms_at_peak=flops / (H100_TFLOPS * 1e9),
                bytes_ms_at_copy=(weights + kv) / (H100_TBS * 1e9))


def idle_gaps(intervals, top=8):
    """Device idle time inside a run of kernels. intervals: [(start_us, end_us, name)] of the
    kernels of one stream, any order. Returns (span_us, busy_us, largest gaps as (gap_us,
    kernel before, kernel after, gap start_us))."""
    spans = sorted(intervals)
    if not spans:
        return 0.0, 0.0, []
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = spans[0]
    for start, end, name in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_name, name, cur_end))
            cur_start = start
        if end >= cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    gaps.sort(key=lambda g: -g[0])
    return cur_end - spans[0][0], busy, gaps[:top]


def forward_idle(runner, dev):
    """idle_gaps of one eager forward's kernels (None when the profiler gives no device
    events). A gap is the device waiting for the host: a sync, or launches slower than the
    kernels they launch."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.model.forward(dev, runner.kv_cache)
            torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA]
    return idle_gaps(kernels) if kernels else None


def kernel_table(runner, step, reps=3):
    from torch.profiler import ProfilerActivity, profile
    dev = step.to(runner.device)
    with torch.inference_mode():
        runner.model.forward(dev, runner.kv_cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                runner.model.forward(dev, runner.kv_cache)
            torch.cuda.synchronize()
    groups = {}
    for e in prof.key_averages():
        us = e.self_device_time_total / reps
        if us <= 0:
            continue
        name = e.key
        for tag in ('_decode_kernel', '_prefill_kernel', '_combine_kernel', 'rms_norm',
                    'rotary', 'store_kv', 'silu', 'nvjet', 'gemm', 'gemv', 'cutlass',
                    'sampling', 'index', 'elementwise', 'reduce', 'copy', 'linear'):
            if tag in name.lower():
                name = tag.strip('_')
                break
        g = groups.setdefault(name, [0.0, 0])
        g[0] += us
        g[1] += e.count // reps
    total = sum(v[0] for v in groups.values())
    return total, sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda r: -r[1])


def profile_case(runner, cfg, decode, prompts, iters):
    """Time one step shape on `runner`; print its tables; return its results."""
    rows = parse_rows(decode, prompts)
    step = build_step(rows, cfg, runner.num_blocks)
    cost = step_cost(rows, cfg)
    res = dict(decode=decode, prompts=prompts, rows=len(rows), **cost)
    with torch.inference_mode():
        replays = (runner.graphs.replays + runner.graphs.prompt_replays
                   + runner.graphs.mixed_replays) if runner.graphs else 0
        res['run_ms'] = device_ms(lambda: runner.run(step), iters)
        after = (runner.graphs.replays + runner.graphs.prompt_replays
                 + runner.graphs.mixed_replays) if runner.graphs else 0
        res['run_path'] = 'graph' if after > replays else 'eager'
        dev = step.to(runner.device)
        if dev.num_tokens == dev.batch_size:
            dev.max_kv_len = cfg.session_len  # the eager decode path's split hint
        res['eager_ms'] = device_ms(lambda: runner.model.forward(dev, runner.kv_cache),
                                    iters)
        t0 = time.perf_counter()
        for _ in range(iters):
            runner.run(step)
        torch.cuda.synchronize()
        res['run_wall_ms'] = (time.perf_counter() - t0) / iters * 1e3
    total, table = kernel_table(runner, step)
    res['eager_kernels_ms'] = total / 1e3
    res['kernels'] = [dict(name=n, us=us, count=c) for n, us, c in table]
    idle = forward_idle(runner, step.to(runner.device))
    print(f"step: {len(rows)} rows, {cost['tokens']} tokens; GEMMs {cost['gemm_tflop']:.2f} "
          f"TFLOP ({cost['gemm_ms_at_peak']:.2f} ms at {H100_TFLOPS:.0f} TFLOP/s), weights "
          f"{cost['weight_gb']:.1f} GB + KV {cost['kv_gb']:.2f} GB "
          f"({cost['bytes_ms_at_copy']:.2f} ms at {H100_TBS} TB/s)")
    print(f"runner.run ({res['run_path']}): {res['run_ms']:.3f} ms device, "
          f"{res['run_wall_ms']:.3f} ms wall per step back to back; eager forward "
          f"{res['eager_ms']:.3f} ms; eager kernel sum {res['eager_kernels_ms']:.3f} ms")
    print('| kernel group | us per step | launches | share |')
    print('|---|---|---|---|')
    for n, us, c in table[:14]:
        print(f'| {n[:60]} | {us:.0f} | {c} | {us / max(total, 1e-9):.0%} |')
    if idle is not None:
        span, busy, gaps = idle
        res['eager_idle'] = dict(span_us=span, busy_us=busy, idle_us=span - busy,
                                 gaps=[dict(us=g, before=a, after=b) for g, a, b, _ in gaps])
        print(f'eager forward, one profiled: {span / 1e3:.3f} ms from its first kernel to its '
              f'last, device idle {(span - busy) / 1e3:.3f} ms; largest gaps:')
        for g, a, b, _ in gaps[:5]:
            print(f'  {g:.0f} us after {a[:50]} before {b[:50]}')
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dummy', default='llama2-7b', help='model shape (random weights)')
    p.add_argument('--decode', default='146:500', help='N:CTX decode rows (N rows over CTX '
                   'cached tokens each); empty for none')
    p.add_argument('--prompts', default='205,205', help='prompt rows: LEN or LEN@CACHED, '
                   'comma-separated; empty for none')
    p.add_argument('--cases', default=None, help="several steps on one runner: "
                   "'DECODE/PROMPTS;DECODE/PROMPTS;...' (overrides --decode/--prompts)")
    p.add_argument('--max_batch_size', type=int, default=256)
    p.add_argument('--max_prefill_tokens', type=int, default=8192)
    p.add_argument('--session_len', type=int, default=2048)
    p.add_argument('--cache_max_entry_count', type=float, default=0.5)
    p.add_argument('--quant_policy', type=int, default=0, choices=(0, 4))
    p.add_argument('--no_cuda_graph', action='store_true')
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--out', default=None, help='JSON results file')
    args = p.parse_args(argv)

    from lmdeploy.turbomind.dummy import dummy_config, dummy_weights
    from lmdeploy.turbomind.model_runner import ModelRunner
    cfg = dummy_config(args.dummy, device='cuda', max_batch_size=args.max_batch_size,
                       max_prefill_tokens=args.max_prefill_tokens, session_len=args.session_len,
                       cache_max_entry_count=args.cache_max_entry_count,
                       quant_policy=args.quant_policy, cuda_graph=not args.no_cuda_graph)
    t0 = time.perf_counter()
    runner = ModelRunner(cfg, weights_init=dummy_weights)
    print(f'runner built in {time.perf_counter() - t0:.1f}s: {runner.num_blocks} blocks',
          flush=True)
    cases = [c.split('/') for c in args.cases.split(';')] if args.cases else [
        (args.decode, args.prompts)]
    results = [profile_case(runner, cfg, decode, prompts, args.iters)
               for decode, prompts in cases]
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), gpu=torch.cuda.get_device_name(),
                           num_blocks=runner.num_blocks, cases=results), f, indent=1)


if __name__ == '__main__':
    main()
