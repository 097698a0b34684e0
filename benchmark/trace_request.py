"""Where one request's first-token latency goes: the engine thread's host ops and the device's
kernels on one clock (torch profiler), summarised as a timeline.

    python3 benchmark/trace_request.py --dummy llama2-7b --input_seqlen 2048
    python3 benchmark/trace_request.py --dummy llama2-7b --input_seqlen 128 --out_dir traces

After `--warmup` untimed requests of the same shape, one request (greedy, `--output_seqlen`
new tokens) runs with the profiler on the engine thread. Printed, in ms from its submission:
when the loop's first host op for it ran, the first and the last device kernel of its prompt
step, the device's idle time between them with the largest gaps and the host ops that ran
during each (the device waiting for the host), and when the caller saw the first token. The
profiler adds host time to every op, so the gaps read somewhat larger than without it: use this
to find where the time goes, and `profile_generation.py` for the latency itself. Writes the
summary as JSON and the chrome trace to `--out_dir` when given.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark.profile_generation import make_prompts, run_round  # noqa: E402
from benchmark.profile_step import idle_gaps  # noqa: E402


def host_ops_during(ops, start, end, top=4):
    """The engine thread's outermost host ops overlapping [start, end] (us), longest overlap
    first, and the part of the interval none of them covers (Python between ops)."""
    hits, covered = [], 0.0
    for s, e, name in ops:
        overlap = min(e, end) - max(s, start)
        if overlap > 0:
            hits.append((overlap, name))
            covered += overlap
    hits.sort(reverse=True)
    return [dict(name=n[:60], us=round(o, 1)) for o, n in hits[:top]], max(0.0, end - start - covered)


def summarise(events, thread_id, submit_us, first_seen_us, top=6):
    from torch.autograd import DeviceType
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == DeviceType.CUDA and e.time_range.start >= submit_us
                     and e.time_range.start <= first_seen_us)
    ops = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                 if e.device_type == DeviceType.CPU and e.thread == thread_id
                 and e.cpu_parent is None and e.time_range.end >= submit_us)
    if not kernels:
        return None
    span, busy, gaps = idle_gaps(kernels, top=top)
    rel = lambda us: round((us - submit_us) / 1e3, 3)  # noqa: E731
    gap_rows = []
    for gap_us, before, after, at in gaps:
        host, python_us = host_ops_during(ops, at, at + gap_us)
        gap_rows.append(dict(us=round(gap_us, 1), at_ms=rel(at), before=before[:60],
                             after=after[:60], host_ops=host, python_us=round(python_us, 1)))
    first_op = next((s for s, _, _ in ops if s >= submit_us), None)
    return dict(first_host_op_ms=rel(first_op) if first_op is not None else None,
                first_kernel_ms=rel(kernels[0][0]), last_kernel_ms=rel(kernels[-1][1]),
                device_busy_ms=round(busy / 1e3, 3), device_idle_ms=round((span - busy) / 1e3, 3),
                first_token_seen_ms=rel(first_seen_us), kernels=len(kernels), gaps=gap_rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('model_path', nargs='?', default=None, help='workspace (or use --dummy)')
    p.add_argument('--dummy', default=None, help='random weights of a named shape, e.g. llama2-7b')
    p.add_argument('--input_seqlen', type=int, default=2048, help='prompt tokens (default: %(default)s)')
    p.add_argument('--output_seqlen', type=int, default=2,
                   help='new tokens of the traced request (default: %(default)s)')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed requests of the same shape first (default: %(default)s)')
    p.add_argument('--device', default=None, help="'cuda', 'cuda:N' or 'cpu'")
    p.add_argument('--cache_max_entry_count', type=float, default=0.5,
                   help='KV pool (fraction of free memory, default: %(default)s)')
    p.add_argument('--no_cuda_graph', action='store_true', help='run every step eagerly')
    p.add_argument('--out_dir', default=None, help='write summary.json and trace.json here')
    args = p.parse_args(argv)
    if not args.model_path and not args.dummy:
        p.error('give a workspace path or --dummy SHAPE')

    from torch.profiler import ProfilerActivity, profile, record_function
    from lmdeploy.turbomind import TurboMind
    overrides = dict(device=args.device, cache_max_entry_count=args.cache_max_entry_count,
                     session_len=args.input_seqlen + args.output_seqlen + 64, max_batch_size=1)
    if args.no_cuda_graph:
        overrides['cuda_graph'] = False
    tm = TurboMind(args.model_path, dummy=args.dummy, **overrides)
    cfg = tm.config
    prompts = make_prompts(1, args.input_seqlen, cfg.vocab_size, cfg.start_id, 0)
    for _ in range(args.warmup):
        run_round(tm, prompts, args.output_seqlen)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available() and cfg.device.startswith('cuda'):
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities)

    def start():  # on the engine thread: the profiler records the thread that starts it
        prof.start()
        stamp = time.perf_counter()
        with record_function('trace_request::clock'):
            pass
        return stamp

    clock_perf = tm.engine.call(start)
    res = run_round(tm, prompts, args.output_seqlen)
    tm.engine.call(prof.stop)
    events = prof.events()
    marker = next(e for e in events if e.name == 'trace_request::clock')
    offset_us = marker.time_range.start - clock_perf * 1e6
    submit_us = res['t0'] * 1e6 + offset_us
    first_seen_us = (res['t0'] + res['ttft'][0]) * 1e6 + offset_us
    summary = summarise(events, marker.thread, submit_us, first_seen_us)
    print(f"one request, {args.input_seqlen} prompt tokens (profiled; TTFT {res['ttft'][0] * 1e3:.2f} ms)")
    if summary is None:
        print('no device kernels recorded (CPU run): see the trace for the host ops')
    else:
        for k in ('first_host_op_ms', 'first_kernel_ms', 'last_kernel_ms', 'device_busy_ms',
                  'device_idle_ms', 'first_token_seen_ms', 'kernels'):
            print(f'  {k}: {summary[k]}')
        print('| gap us | at ms | before | after | host ops during it (us) | python us |')
        print('|---|---|---|---|---|---|')
        for g in summary['gaps']:
            host = ', '.join(f"{h['name']} {h['us']:.0f}" for h in g['host_ops'])
            print(f"| {g['us']:.0f} | {g['at_ms']:.3f} | {g['before'][:40]} | {g['after'][:40]} | "
                  f"{host} | {g['python_us']:.0f} |")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, 'summary.json'), 'w') as f:
            json.dump(dict(args=vars(args), ttft_ms=res['ttft'][0] * 1e3, summary=summary), f,
                      indent=1)
        prof.export_chrome_trace(os.path.join(args.out_dir, 'trace.json'))


if __name__ == '__main__':
    main()
