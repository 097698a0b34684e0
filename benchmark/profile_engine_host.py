"""Host overhead of the engine loop at a large batch, without a model.

    python benchmark/profile_engine_host.py --rows 64,256 --steps 200 [--device cpu|cuda]
        [--vocab 32000] [--clients threads|none] [--device_ms 6] [--schedule sync,ahead,jit]
        [--cprofile engine.prof] [--out host.json]
    python benchmark/profile_engine_host.py --arrival_rate 4 --requests 100 --rows 4 \
        --device_ms 6 [--schedule sync,ahead,jit] [--arrival_len 16]

The real Engine, the real C++ scheduler, the real sampler and the real
`TurboMindInstance.stream_infer` callers, with one thing replaced: the ModelRunner. Its stand-in
returns ready-made logits at once (a measurement harness: the forward's device time is not what
is measured here). `--rows` requests start together, each streamed by its own client thread
(`--clients threads`, as in profile_throughput and the servers) or submitted straight to the
engine with nobody waiting (`--clients none`: the engine's own cost); the sampling parameters are
mixed (greedy, top-k, top-p, temperature, a repetition penalty on a quarter of the rows, seeds).
Once every row decodes, `--steps` steps are timed.

Printed per row count: host microseconds per step split by phase (jit_wait, schedule,
step_input, sample_prep, forward, sample, wake, sync, update, dispatch; see `step_timer.py`;
jit_wait is the wait to plan the next step just in time, commands running), the engine
thread's CPU time per step (wall minus CPU is time the engine waited: the GIL or the device),
and the callers' side: how many wake-ups per step they got and their CPU time per wake-up.
`--device_ms` adds a stand-in for the forward's device time, to see what the host work and
the callers' wake-ups add on top of it: with `--async_schedule on` (the engine's default) the
host plans and launches the next step while the device works, so a step costs about
max(device, host) instead of device + host; `hidden_us` reports device_ms + host work - step wall.

`--schedule` picks the loop (one report each): `sync` (async_schedule off: plan, launch, wait,
commit), `ahead` (async_schedule on, the next step planned as soon as the current one starts)
or `jit` (async_schedule on and jit_schedule on: the next step planned just in time, shortly
before the current one ends, so that arrivals during a step still make the next one; see
engine.py), or `jit5` (the same with Python's 5 ms GIL switch interval left alone: jit lowers
it). `--async_schedule on|off` is the older spelling of `--schedule jit|sync`.

`--arrival_rate R` measures latency instead: `--rows` streams decode all along, and
`--requests` more (prompt 32 tokens, `--arrival_len` tokens out, each streamed by a client
thread) arrive at Poisson times at R per second. Reported per schedule: the time from a
request's submit to its first streamed token (TTFT p50 / p99 / mean), steps/s, how long the
stand-in device idled per step (CPU only) and the just-in-time waits (`jit_waits`, and
`jit_misses`: waits after which the device had finished before the next step was queued).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import sys
import threading
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT_LEN = 32
WARMUP_STEPS = 8


class ReadyLogits:
    """ModelRunner's `run(step)` contract with the forward replaced by ready-made logits.

    `device_ms` stands in for the forward's device time: on CUDA a spin kernel of that length
    is queued (the host goes on, as after a graph replay, and waits at the token sync); on the
    CPU a simulated device: run() returns at once and the step's tokens are ready `device_ms`
    after the device is free of the previous steps (the engine's token wait sleeps until then,
    GIL released; see `simulated_device`)."""

    def __init__(self, cfg, num_blocks: int, device: str, device_ms: float = 0.0):
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(0)
        rows = cfg.max_batch_size + cfg.max_prefill_tokens
        self.logits = torch.randn(rows, cfg.vocab_size, generator=gen).to(device)
        self.device_ms = device_ms
        self.cycles = 0
        if device_ms and self.device.type == 'cuda':
            self.cycles = int(device_ms * cycles_per_ms(self.device))
        self.busy_until = 0.0
        self.ready_at = collections.deque()  # per launched step, in launch order (CPU only)
        self.idle_s = 0.0  # the simulated device's time without work since the first step

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def run(self, step, timer=None):
        if self.cycles:
            torch.cuda._sleep(self.cycles)
        elif self.device_ms:
            now = time.perf_counter()
            if self.busy_until:
                self.idle_s += max(0.0, now - self.busy_until)
            self.busy_until = max(now, self.busy_until) + self.device_ms / 1000
            self.ready_at.append(self.busy_until)
        return self.logits[:step.sample_idx.shape[0]]

    def wait_step(self):
        """The oldest launched step is done (each launched step is waited for once, in order)."""
        if self.ready_at:
            delay = self.ready_at.popleft() - time.perf_counter()
            if delay > 0:
                time.sleep(delay)


@contextlib.contextmanager
def simulated_device(stand_in: ReadyLogits):
    """On the CPU: the engine's wait for a step's tokens waits for the simulated device."""
    from lmdeploy.turbomind.engine import _Launched
    real = _Launched.wait

    def wait(self):
        stand_in.wait_step()
        return real(self)

    _Launched.wait = wait
    try:
        yield
    finally:
        _Launched.wait = real


def cycles_per_ms(device=None) -> float:
    """Clock cycles of `torch.cuda._sleep` per millisecond on `device` (a spin kernel of a
    known length stands in for device work in the host benchmarks and tests)."""
    torch.cuda._sleep(1000)  # warm up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize(device)
    return 10_000_000 / start.elapsed_time(end)


def sampling_mix(i: int) -> dict:
    """Row i's sampling parameters: a mix like a real serving load."""
    kind = i % 4
    params = [dict(top_k=1), dict(top_k=40, top_p=1.0, temperature=1.0),
              dict(top_k=0, top_p=0.9, temperature=0.7), dict(top_k=40, top_p=0.8,
                                                             temperature=0.8)][kind]
    if i % 8 == 3:
        params['repetition_penalty'] = 1.1
    params['random_seed'] = i if i % 2 else None
    return params


def output_len(steps: int) -> int:
    return 2 * (WARMUP_STEPS + steps) + 64  # never runs out: cancelled once measured


SCHEDULES = ('sync', 'ahead', 'jit', 'jit5')



def _stop(engine, rows: int, threads, errors):
    """End the background requests (sessions 1..rows), join their threads, close the engine
    and re-raise the first error a thread hit."""
    engine.call(lambda: [engine.scheduler.cancel(i + 1, False) for i in range(rows)])
    for th in threads:
        th.join()
    engine.close()
    if errors:
        raise errors[0]

def build(rows: int, steps: int, vocab: int, device: str, device_ms: float,
          schedule: str = 'jit', out_len: int = 0):
    """An engine over the stand-in runner for `rows` rows of up to `out_len` tokens out
    (default: enough for `steps` timed steps)."""
    from lmdeploy.turbomind.dummy import dummy_config
    from lmdeploy.turbomind.engine import Engine
    if schedule not in SCHEDULES:
        raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
    total = PROMPT_LEN + (out_len or output_len(steps)) + 8
    cfg = dummy_config('llama2-7b', device=device, max_batch_size=rows, vocab_size=vocab,
                       session_len=max(2048, total + 1), max_prefill_tokens=rows * PROMPT_LEN,
                       async_schedule=schedule != 'sync')
    num_blocks = rows * math.ceil(total / cfg.block_size) + 8
    sys.setswitchinterval(0.005)  # Python's default: an earlier jit run lowered it
    engine = Engine(ReadyLogits(cfg, num_blocks, device, device_ms))
    engine.jit_schedule = schedule in ('jit', 'jit5')
    if schedule == 'jit5':  # jit with the 5 ms switch interval left alone
        engine.JIT_SWITCH_INTERVAL = None
    # What TurboMindInstance reads from its TurboMind.
    tm = types.SimpleNamespace(engine=engine, config=cfg, eos_id=cfg.end_id, stop_words=[],
                               session_len=cfg.session_len)
    return tm, engine


def measure(rows: int, steps: int, vocab: int, device: str, clients: str, device_ms: float = 0.0,
            cprofile=None, schedule: str = 'jit'):
    tm, engine = build(rows, steps, vocab, device, device_ms, schedule)
    device_sim = (simulated_device(engine.runner) if device == 'cpu' and device_ms
                  else contextlib.nullcontext())
    with device_sim:
        report = _measure(tm, engine, rows, steps, vocab, clients, cprofile)
    report.update(rows=rows, clients=clients, device=device, vocab=vocab, device_ms=device_ms,
                  schedule=schedule, async_schedule=schedule != 'sync')
    if device_ms:
        host = sum(report.get(f'{p}_us', 0.0) for p in PHASES if p not in WAITS)
        report['hidden_us'] = device_ms * 1000 + host - report['step_us']
    return report


def measure_arrivals(rate: float, requests: int, rows: int, vocab: int, device: str,
                     device_ms: float, schedule: str = 'jit', arrival_len: int = 16,
                     seed: int = 0):
    """TTFT of requests arriving at Poisson times (`rate` per second) while `rows` streams
    decode; see the module docstring."""
    import random

    from lmdeploy.turbomind.step_timer import StepTimer
    from lmdeploy.turbomind.turbomind import TurboMindInstance
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    # the background rows decode until cancelled: enough tokens for the whole run
    run_steps = (arrivals[-1] + 2.0) * 1000 / device_ms + 10 * WARMUP_STEPS
    bg_len = int(run_steps * 1.5) + 64
    slots = rows + max(8, min(requests, int(rate * (arrival_len + 4) * device_ms / 1000 * 4) + 8))
    tm, engine = build(slots, 0, vocab, device, device_ms, schedule, out_len=bg_len)
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, vocab, (rows + requests, PROMPT_LEN), generator=gen).tolist()
    ttft = [None] * requests
    errors = []

    def stream(i, n_out, first=None):
        try:
            t0 = time.perf_counter()
            for _ in TurboMindInstance(tm).stream_infer(
                    i + 1, prompts[i], request_output_len=n_out, sequence_start=True,
                    sequence_end=True, ignore_eos=True, stream_output=True, **sampling_mix(i)):
                if first is not None and first[i - rows] is None:
                    first[i - rows] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    device_sim = (simulated_device(engine.runner) if device == 'cpu'
                  else contextlib.nullcontext())
    with device_sim:
        background = [threading.Thread(target=stream, args=(i, bg_len), daemon=True)
                      for i in range(rows)]
        for th in background:
            th.start()
        while not engine.call(lambda: engine.scheduler.num_running() == rows
                              and engine.scheduler.num_waiting() == 0):
            time.sleep(0.01)
        engine.timer = timer = StepTimer()
        while engine.call(lambda: timer.steps) < 4 * WARMUP_STEPS:  # the estimates settle
            time.sleep(0.01)
        engine.call(timer.reset)
        idle0, jit0 = engine.runner.idle_s, (engine.jit_waits, engine.jit_misses)
        t_start = time.perf_counter()
        clients = []
        for j, at in enumerate(arrivals):
            delay = t_start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=stream, args=(rows + j, arrival_len, ttft),
                                  daemon=True)
            th.start()
            clients.append(th)
        for th in clients:
            th.join()
        report = engine.call(timer.report)
        elapsed = time.perf_counter() - t_start
        idle = engine.runner.idle_s - idle0
        jit_waits, jit_misses = engine.jit_waits - jit0[0], engine.jit_misses - jit0[1]
        engine.timer = None
        decoding = engine.call(lambda: engine.scheduler.num_running())
        _stop(engine, rows, background, errors)
    if decoding < rows:
        raise RuntimeError('the background rows finished before the arrivals did')
    ms = sorted(x * 1000 for x in ttft)
    report.update(
        rate=rate, requests=requests, rows=rows, arrival_len=arrival_len, device=device,
        vocab=vocab, device_ms=device_ms, schedule=schedule, elapsed_s=elapsed,
        steps_per_s=report['steps'] / elapsed, ttft_ms_p50=_quantile(ms, 0.5),
        ttft_ms_p99=_quantile(ms, 0.99), ttft_ms_mean=sum(ms) / len(ms),
        jit_waits=jit_waits, jit_misses=jit_misses)
    if device == 'cpu':
        report['device_idle_us_per_step'] = idle / max(1, report['steps']) * 1e6
    return report


def _quantile(xs, q: float) -> float:
    """Linear interpolation between the closest ranks of sorted `xs`."""
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _measure(tm, engine, rows: int, steps: int, vocab: int, clients: str, cprofile=None):
    from lmdeploy.turbomind.engine import Request
    from lmdeploy.turbomind.sampling import SamplingParams
    from lmdeploy.turbomind.step_timer import StepTimer
    from lmdeploy.turbomind.turbomind import TurboMindInstance
    n_out = output_len(steps)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, vocab, (rows, PROMPT_LEN), generator=gen).tolist()
    wakeups = [0] * rows
    cpu = [0.0] * rows
    errors = []

    def client(i):
        t0 = time.thread_time()
        try:
            for _ in TurboMindInstance(tm).stream_infer(
                    i + 1, prompts[i], request_output_len=n_out, sequence_start=True,
                    sequence_end=True, ignore_eos=True, stream_output=True, **sampling_mix(i)):
                wakeups[i] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        cpu[i] = time.thread_time() - t0

    threads = []
    if clients == 'threads':
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(rows)]
        for t in threads:
            t.start()
    else:
        cond = threading.Condition()
        for i in range(rows):
            mix = sampling_mix(i)
            seed = mix.pop('random_seed')
            params = SamplingParams(**mix, bad_words=(tm.eos_id,), random_seed=seed)
            engine.submit(Request(i + 1, params, cond, random_seed=seed),
                          input_ids=prompts[i], request_output_len=n_out, sequence_end=True,
                          end_id=-1, ignore_eos=True)

    def decoding():
        return engine.scheduler.num_running() == rows and engine.scheduler.num_waiting() == 0

    while not engine.call(decoding):
        time.sleep(0.01)
    engine.timer = timer = StepTimer()
    while engine.call(lambda: timer.steps) < WARMUP_STEPS:
        time.sleep(0.005)
    profiler = None
    if cprofile:
        import cProfile
        profiler = cProfile.Profile()
        engine.call(profiler.enable)  # runs on the engine thread: profiles the loop
    base_wakeups = sum(wakeups)
    engine.call(timer.reset)
    t0 = time.perf_counter()
    while engine.call(lambda: timer.steps) < steps:
        if engine.call(lambda: engine.scheduler.num_running()) < rows:
            raise RuntimeError('requests finished before the timed steps were done')
        time.sleep(0.002)
    report = engine.call(timer.report)
    elapsed = time.perf_counter() - t0
    measured_wakeups = sum(wakeups) - base_wakeups
    if profiler is not None:
        engine.call(profiler.disable)
        profiler.dump_stats(cprofile)
    engine.timer = None
    _stop(engine, rows, threads, errors)
    report.update(steps_per_s=report['steps'] / elapsed, steps_ahead=engine.steps_ahead)
    if threads:
        done_wakeups = max(1, sum(wakeups))
        report['client_wakeups_per_step'] = measured_wakeups / max(1, report['steps'])
        report['client_cpu_us_per_wakeup'] = sum(cpu) / done_wakeups * 1e6
    return report


PHASES = ('jit_wait', 'schedule', 'step_input', 'sample_prep', 'forward', 'sample', 'wake', 'sync',
          'update', 'dispatch')
WAITS = ('jit_wait', 'sync', 'forward')  # not host work (forward: a wait on CUDA with device_ms)


def print_report(r: dict):
    print(f'\nrows {r["rows"]}, clients {r["clients"]}, device {r["device"]}, vocab {r["vocab"]}, '
          f'device_ms {r["device_ms"]:g}, schedule {r["schedule"]}: '
          f'{r["steps"]} steps, {r["steps_per_s"]:.1f} steps/s')
    print(f'  step wall {r["step_us"]:9.0f} us   engine thread CPU {r["cpu_us"]:9.0f} us')
    if 'hidden_us' in r:
        print(f'  host work hidden behind the device: {r["hidden_us"]:.0f} us per step')
    for phase in PHASES:
        if f'{phase}_us' in r:
            print(f'  {phase:<12} {r[f"{phase}_us"]:9.0f} us')
    if 'client_wakeups_per_step' in r:
        print(f'  callers: {r["client_wakeups_per_step"]:.1f} wake-ups per step, '
              f'{r["client_cpu_us_per_wakeup"]:.0f} us CPU per wake-up')
    if r.get('jit_waits'):
        print(f'  just in time: {r["jit_waits"]} waits, {r.get("jit_misses", 0)} misses')


def print_arrivals_report(r: dict):
    idle = (f', device idle {r["device_idle_us_per_step"]:.0f} us/step'
            if 'device_idle_us_per_step' in r else '')
    print(f'{r["schedule"]:>6}: TTFT p50 {r["ttft_ms_p50"]:6.1f} ms  '
          f'p99 {r["ttft_ms_p99"]:6.1f} ms  mean {r["ttft_ms_mean"]:6.1f} ms   '
          f'{r["steps_per_s"]:6.1f} steps/s{idle}   '
          f'jit waits {r["jit_waits"]} misses {r["jit_misses"]}')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rows', default='64,256',
                   help='comma-separated numbers of concurrent requests (default: %(default)s)')
    p.add_argument('--steps', type=int, default=200,
                   help='decode steps timed per row count (default: %(default)s)')
    p.add_argument('--vocab', type=int, default=1024,
                   help='vocabulary size of the ready-made logits; on CPU the sampler\'s tensor '
                        'work grows with it, keep it small to see the host overhead '
                        '(default: %(default)s; 32000 is Llama-2\'s)')
    p.add_argument('--device', default='cpu', help="where logits and sampling live: 'cpu' or "
                   "'cuda' (default: %(default)s)")
    p.add_argument('--device_ms', type=float, default=0.0,
                   help='device time of the stand-in forward per step: on CUDA a spin kernel '
                        '(the host waits for it at the token sync, as with a real forward); on '
                        'the CPU a sleep inside run() (default: %(default)s)')
    p.add_argument('--clients', default='threads', choices=('threads', 'none'),
                   help='threads: one streaming stream_infer caller thread per request; none: '
                        'requests submitted with nobody waiting (default: %(default)s)')
    p.add_argument('--cprofile', default=None, metavar='FILE',
                   help='cProfile the engine thread during the timed steps (last row count), '
                        'stats written to FILE')
    p.add_argument('--schedule', default=None,
                   help='comma-separated loops to measure, of sync (async_schedule off), ahead '
                        '(async_schedule on, next step planned at once), jit (planned just in '
                        'time, GIL switch interval lowered) and jit5 (jit, switch interval left '
                        'at 5 ms); default: jit, with --arrival_rate sync,ahead,jit')
    p.add_argument('--async_schedule', default=None, choices=('on', 'off'),
                   help='older spelling of --schedule jit (on) / sync (off)')
    p.add_argument('--arrival_rate', type=float, default=0.0, metavar='R',
                   help='latency mode: --requests requests arrive at Poisson times, R per '
                        'second, while --rows streams decode (one row count; needs --device_ms)')
    p.add_argument('--requests', type=int, default=60,
                   help='requests arriving in the latency mode (default: %(default)s)')
    p.add_argument('--arrival_len', type=int, default=16,
                   help='tokens out per arriving request (default: %(default)s)')
    p.add_argument('--out', default=None, help='write the reports as JSON')
    args = p.parse_args(argv)
    try:
        args.rows = [int(x) for x in args.rows.split(',')]
    except ValueError:
        p.error(f'--rows must be comma-separated integers, got {args.rows!r}')
    if any(r < 1 for r in args.rows) or args.steps < 1 or args.vocab < 16 or args.device_ms < 0:
        p.error('--rows and --steps must be >= 1, --vocab >= 16, --device_ms >= 0')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error('--device cuda: CUDA is not available')
    if args.schedule is not None and args.async_schedule is not None:
        p.error('give --schedule or --async_schedule, not both')
    if args.async_schedule is not None:
        args.schedule = 'jit' if args.async_schedule == 'on' else 'sync'
    if args.schedule is None:
        args.schedule = 'sync,ahead,jit' if args.arrival_rate else 'jit'
    args.schedule = args.schedule.split(',')
    if not args.schedule or any(s not in SCHEDULES for s in args.schedule):
        p.error(f'--schedule takes a comma-separated list of {", ".join(SCHEDULES)}')
    if args.arrival_rate:
        if args.arrival_rate < 0 or args.requests < 1 or args.arrival_len < 1:
            p.error('--arrival_rate must be > 0, --requests and --arrival_len >= 1')
        if not args.device_ms:
            p.error('--arrival_rate needs --device_ms (the stand-in device time per step)')
        if len(args.rows) != 1:
            p.error('--arrival_rate takes one --rows count (the streams decoding all along)')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.device == 'cpu':
        torch.set_num_threads(1)  # the CPU stands in for the device: keep it off the other cores
    reports = []
    if args.arrival_rate:
        print(f'{args.requests} requests at {args.arrival_rate:g}/s (Poisson, prompt {PROMPT_LEN}, '
              f'{args.arrival_len} out) beside {args.rows[0]} decoding rows, device_ms '
              f'{args.device_ms:g}, device {args.device}:')
        for schedule in args.schedule:
            r = measure_arrivals(args.arrival_rate, args.requests, args.rows[0], args.vocab,
                                 args.device, args.device_ms, schedule, args.arrival_len)
            print_arrivals_report(r)
            reports.append(r)
    for i, rows in enumerate(args.rows if not args.arrival_rate else ()):
        for j, schedule in enumerate(args.schedule):
            last = i == len(args.rows) - 1 and j == len(args.schedule) - 1
            r = measure(rows, args.steps, args.vocab, args.device, args.clients, args.device_ms,
                        args.cprofile if last else None, schedule=schedule)
            print_report(r)
            reports.append(r)
    if args.cprofile:
        import pstats
        print(f'\ncProfile of the engine thread ({args.cprofile}), top 25 by total time:')
        pstats.Stats(args.cprofile).sort_stats('tottime').print_stats(25)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(reports, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
