"""Host and device time of one sampler call on a CUDA GPU, eager `Sampler` vs `SamplerGraphs`;
print a table, write JSON.

    python3 benchmark/bench_sampler.py [--out bench_sampler.json] [--rows 1,4,32,64,256]
                                       [--vocab 32000,128256] [--calls 50]

Each call is what the engine's `_launch` makes: a `SamplingSlots` batch (seeded rows, reused
across steps, counters advanced on the device between calls) and int32 tokens out (eager:
``Sampler()(logits, batch).to(torch.int32)``; graphs: `SamplerGraphs` with ``out_dtype=int32``,
its graph captured before the timing). Per row count, mode and vocabulary:

* host_us: the median wall time of the Python call, with no synchronize inside the timed loop
  (the device runs behind): the host time the engine loop spends per step;
* device_us: CUDA events around `DEVICE_CALLS` calls queued behind a spin kernel long enough
  for the host to queue them all, divided by their number: the device's own time per call,
  without the launch gaps a host-bound eager loop leaves (`queued` False when the host did not
  get them all queued in time: then the figure includes gaps).

Rows above the largest bucket (64) fall back to eager in `SamplerGraphs` (impl
'graphs(eager)'). The table ends with the host cost of the engine's `_copy_to_host` (a pinned
buffer, an asynchronous copy and an event per step). Under ~60 s on the H100.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.profile_engine_host import cycles_per_ms  # noqa: E402
from lmdeploy.turbomind.sampler_graphs import SamplerGraphs  # noqa: E402
from lmdeploy.turbomind.sampling import RequestRng, Sampler, SamplingParams  # noqa: E402
from lmdeploy.turbomind.sampling_slots import SamplingSlots  # noqa: E402

DEVICE_CALLS = 8  # few enough that the eager calls' launches fit the device's launch queue
GREEDY = dict(top_k=1, top_p=1.0, temperature=1.0)
MODES = {  # per-row parameters, cycled over the rows
    'temperature': [dict(top_k=0, top_p=1.0, temperature=1.0)],
    'top_p': [dict(top_k=0, top_p=0.9, temperature=1.0)],
    'top_k40+top_p': [dict(top_k=40, top_p=0.8, temperature=0.8)],
    'mixed': [dict(top_k=40, top_p=0.8, temperature=0.8), GREEDY,
              dict(top_k=0, top_p=0.9, temperature=1.0), dict(top_k=0, top_p=1.0, temperature=1.0)],
    # ignore_eos bans the EOS id: B1/B2 (greedy) and B4 (temperature 1) sample so
    'greedy+bad': [dict(GREEDY, bad_words=(2,))],
    'temperature+bad': [dict(top_k=0, top_p=1.0, temperature=1.0, bad_words=(2,))],
}
ROWS = []
HEADER = (f"{'vocab':>6} {'rows':>4} {'mode':<14} {'impl':<14} {'host_us':>9} {'device_us':>9} "
          f"{'queued':>6}")


def make_batch(rows: int, mode: str):
    slots = SamplingSlots(rows)
    pattern = MODES[mode]
    idx = np.array([slots.add(SamplingParams(random_seed=i, **pattern[i % len(pattern)]),
                              RequestRng(i)) for i in range(rows)], dtype=np.int64)
    return slots, idx, slots.batch(idx, 'cuda')


def host_us(call, advance, calls: int) -> float:
    """Median wall time of one call; the counters move between calls, as in the engine."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        advance()
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def device_us(call, host: float, cycles: float):
    """(device us per call, whether all calls were queued before the device reached them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    queued = True
    for _ in range(3):
        lead_ms = 1.5 * DEVICE_CALLS * host / 1e3 + 2.0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(int(lead_ms * cycles))
        start.record()
        for _ in range(DEVICE_CALLS):
            call()
        end.record()
        queued &= (time.perf_counter() - t0) * 1e3 < lead_ms
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) * 1e3 / DEVICE_CALLS)
    return statistics.median(runs), queued


def record(vocab, rows, mode, impl, host, device, queued):
    row = dict(vocab=vocab, rows=rows, mode=mode, impl=impl, host_us=host, device_us=device,
               queued=queued)
    ROWS.append(row)
    print(fmt_row(row), flush=True)


def fmt_row(r) -> str:
    device = '-' if r['device_us'] is None else f"{r['device_us']:9.1f}"
    return (f"{r['vocab']:>6} {r['rows']:>4} {r['mode']:<14} {r['impl']:<14} "
            f"{r['host_us']:9.1f} {device:>9} {str(r['queued']):>6}")


def bench_sampler(vocab: int, row_counts, calls: int, cycles: float, modes=tuple(MODES)):
    gen = torch.Generator(device='cuda').manual_seed(vocab)
    logits = torch.randn(max(row_counts), vocab, device='cuda', generator=gen) * 3
    eager = Sampler()
    graphs = SamplerGraphs(Sampler(), vocab, 'cuda', max_rows=max(row_counts),
                           out_dtype=torch.int32)
    for rows in row_counts:
        x = logits[:rows]
        for mode in modes:
            slots, idx, batch = make_batch(rows, mode)

            def advance():
                slots.advance(idx, batch)

            impls = (('eager', lambda: eager(x, batch).to(torch.int32)),
                     ('graphs', lambda: graphs(x, batch)))
            for impl, call in impls:
                for _ in range(3):  # warm-up; the graph's capture
                    call()
                if impl == 'graphs' and graphs.key(x, batch) is None:
                    impl = 'graphs(eager)'
                host = host_us(call, advance, calls)
                device, queued = device_us(call, host, cycles)
                record(vocab, rows, mode, impl, host, device, queued)
    return graphs


def bench_copy_to_host(row_counts, calls: int):
    try:
        from lmdeploy.turbomind.engine import _copy_to_host
    except ImportError as e:  # the compiled core is not built here
        print(f'_copy_to_host skipped: {e}')
        return
    for rows in row_counts:
        tokens = torch.zeros(rows, dtype=torch.int32, device='cuda')
        # the engine waits for each step's copy before the next one, so the pinned buffer
        # of the last copy is free again: the same here, untimed
        host_us(lambda: _copy_to_host(tokens), torch.cuda.synchronize, 5)
        host = host_us(lambda: _copy_to_host(tokens), torch.cuda.synchronize, calls)
        record(0, rows, '-', '_copy_to_host', host, None, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='bench_sampler.json')
    ap.add_argument('--rows', default='1,4,32,64,256')
    ap.add_argument('--vocab', default='32000,128256')
    ap.add_argument('--calls', type=int, default=50, help='timed calls per host_us figure')
    ap.add_argument('--modes', default=','.join(MODES),
                    help='sampling modes to time, comma-separated (default: all: %(default)s)')
    a = ap.parse_args()
    unknown = set(a.modes.split(',')) - set(MODES)
    if unknown:
        ap.error(f"unknown --modes {', '.join(sorted(unknown))} (known: {', '.join(MODES)})")
    if not torch.cuda.is_available():
        sys.exit('bench_sampler.py needs a CUDA GPU (it times kernel launches and CUDA graphs)')
    t0 = time.time()
    row_counts = [int(r) for r in a.rows.split(',')]
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, argv=sys.argv)
    print(info)
    print(HEADER)
    cycles = cycles_per_ms()
    captures = {}
    for vocab in (int(v) for v in a.vocab.split(',')):
        graphs = bench_sampler(vocab, row_counts, a.calls, cycles, a.modes.split(','))
        captures[vocab] = dict(graphs=graphs.captures, pool_bytes=graphs.pool_bytes(),
                               input_bytes=graphs.input_bytes,
                               reserve_bytes=SamplerGraphs.reserve_bytes(max(row_counts), vocab))
        del graphs
    bench_copy_to_host(row_counts, a.calls)
    info.update(seconds=time.time() - t0, graphs=captures)
    print('\n' + HEADER)
    for r in ROWS:
        print(fmt_row(r))
    print({v: {k: round(b / 2**20, 1) if k.endswith('bytes') else b for k, b in c.items()}
           for v, c in captures.items()}, f'{info["seconds"]:.1f} s')
    with open(a.out, 'w') as f:
        json.dump(dict(info=info, rows=ROWS), f, indent=1, default=str)


if __name__ == '__main__':
    main()
