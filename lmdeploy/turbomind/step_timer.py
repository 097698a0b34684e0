"""Host time of the engine's steps, split by phase (off unless asked for).

    engine.timer = StepTimer()        # from any thread; the loop picks it up at its next step
    ...
    print(engine.call(engine.timer.report))   # microseconds per step for each phase

The loop calls `begin()` when a step starts, `lap(phase)` after each phase (the time since the
previous mark goes to `phase`) and `end(rows, decode_only)` when the step is over; steps that
only decode (CUDA-graph steps on GPU) and mixed ones (prefill chunks too) are also counted
apart. Wall time, so a phase that waits (the device, the GIL) shows that wait; `cpu_us` (this
thread's CPU time) tells the two apart (a CUDA sync spins, so on GPU it counts as CPU).

Phases of the engine (engine.py): jit_wait (waiting, commands running, to plan the next step
just in time), schedule, step_input, sample_prep, forward (with graphs: graph_load, graph_replay,
graph_out), sample_batch (the sampling batch on the device), sample (the sampler), sample_copy
(counters, tokens to the host), wake, sync (the wait for the outstanding step's tokens),
update, dispatch. `count(name)` counts events (the engine's
'jit_waits', and 'jit_misses': waits after which the device had finished before the next step
was queued; with the sampler graphs, 'sampler_replays' and 'sampler_fallbacks': steps whose
sampling replayed a graph or ran eagerly); the report has their totals. `observe(name, seconds)` keeps one value per event
(e.g. a request's wait before its first step): the report has their count, mean, p50, p90,
p99 and max in milliseconds (`<name>_n`, `<name>_ms_mean`, ...). Each step observes itself too:
`step` (its wall time), `step_sync` (its wait for the device's tokens) and `step_host` (the
rest, less any just-in-time wait): a slow step's tail tells a late device (sync) from a late
host (host), e.g. behind a per-token p99 far above its p50. The engine observes where its requests'
first tokens spent their time (`ttft_queue`: submit -> its first step queued on the device;
`ttft_step`: -> tokens handed over, split into `ttft_step_ahead`: the step ahead of it still on
the device, `ttft_step_device`: its own step, `ttft_step_handover`: its tokens on the host ->
handed over); a server may add its own (its request -> submit, tokens
handed over -> seen by the server). It also observes each step's device time as its planner
measures it (`device_decode`, `device_mixed`: from the previous step's tokens to this step's,
while the device went straight from one to the next), e.g. a prompt's mixed step under load.
"""
from __future__ import annotations

import time
from typing import Dict, List


class StepTimer:

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals: Dict[str, float] = {}
        self.steps = 0
        self.rows = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.kinds: Dict[str, list] = {'decode': [0, 0.0], 'mixed': [0, 0.0]}  # [steps, wall]
        self.counts: Dict[str, int] = {}
        self.observed: Dict[str, List[float]] = {}
        # a step under way (reset runs as a command, maybe while the loop waits inside a step)
        # is counted from now
        self._t = self._t0 = time.perf_counter()
        self._c0 = time.thread_time()
        self._waits = self._sync = 0.0

    def begin(self):
        self._t = self._t0 = time.perf_counter()
        self._c0 = time.thread_time()
        self._waits = 0.0  # this step's sync and jit_wait laps
        self._sync = 0.0

    def lap(self, phase: str):
        now = time.perf_counter()
        dt = now - self._t
        self.totals[phase] = self.totals.get(phase, 0.0) + dt
        if phase == 'sync':
            self._sync += dt
            self._waits += dt
        elif phase == 'jit_wait':
            self._waits += dt
        self._t = now

    def count(self, name: str):
        self.counts[name] = self.counts.get(name, 0) + 1

    def observe(self, name: str, seconds: float):
        """One value of `name` (any thread: a list append)."""
        values = self.observed.get(name)
        if values is None:
            values = self.observed.setdefault(name, [])
        values.append(seconds)

    def end(self, rows: int, decode_only: bool = True):
        wall = time.perf_counter() - self._t0
        self.steps += 1
        self.rows += rows
        self.wall += wall
        self.cpu += time.thread_time() - self._c0
        kind = self.kinds['decode' if decode_only else 'mixed']
        kind[0] += 1
        kind[1] += wall
        self.observe('step', wall)
        self.observe('step_sync', self._sync)
        self.observe('step_host', wall - self._waits)

    def report(self) -> Dict[str, float]:
        """Per step: {'steps', 'rows_per_step', 'step_us', 'cpu_us', '<phase>_us', ...,
        'decode_steps', 'decode_step_us', 'mixed_steps', 'mixed_step_us', '<count>': total}."""
        n = max(1, self.steps)
        out = {'steps': self.steps, 'rows_per_step': self.rows / n,
               'step_us': self.wall / n * 1e6, 'cpu_us': self.cpu / n * 1e6}
        for phase, total in self.totals.items():
            out[f'{phase}_us'] = total / n * 1e6
        for kind, (steps, wall) in self.kinds.items():
            out[f'{kind}_steps'] = steps
            out[f'{kind}_step_us'] = wall / max(1, steps) * 1e6
        out.update(self.counts)
        for name, values in list(self.observed.items()):
            ms = sorted(v * 1e3 for v in values)
            if ms:
                out.update({f'{name}_n': len(ms), f'{name}_ms_mean': sum(ms) / len(ms),
                            f'{name}_ms_p50': ms[len(ms) // 2],
                            f'{name}_ms_p90': ms[min(len(ms) - 1, int(len(ms) * 0.9))],
                            f'{name}_ms_p99': ms[min(len(ms) - 1, int(len(ms) * 0.99))],
                            f'{name}_ms_max': ms[-1]})
        return out
