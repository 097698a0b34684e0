"""Async scheduling (the engine plans step n+1 while step n runs): the pipelined loop must give
exactly what the synchronous loop gives (greedy and seeded), across multi-turn sessions, stop
words, cancel, concurrent requests, preemption and chunked prefill (CPU, tiny fixtures)."""
import collections
import random
import sys
import threading
import time

import numpy as np
import pytest
import torch

from lmdeploy.turbomind import TurboMind
from lmdeploy.turbomind import engine as engine_mod
from lmdeploy.turbomind.errors import EngineError
from tests.turbomind.test_engine import (BASE, SAMPLING, Background, Chat, fresh, hf_greedy,
                                         infer, on_engine, prompt, run_threads, session_tokens)

CONFIGS = {
    'plain': dict(),
    # a pool too small for everyone with greedy admission (preemption, eviction) and a small
    # prefill budget (chunks)
    'tight': dict(max_batch_size=6, block_size=4, num_blocks=30, max_prefill_tokens=8,
                  admit_horizon=-1),
}


@pytest.fixture(scope='module')
def pair(workspace):
    """`pair(config) -> (async engine, synchronous engine)` on the gqa fixture."""
    made = {}

    def get(config='plain', variant='gqa'):
        key = (config, variant)
        if key not in made:
            kw = {**BASE, **CONFIGS[config]}
            made[key] = (TurboMind(workspace(variant), async_schedule=True, **kw),
                         TurboMind(workspace(variant), async_schedule=False, **kw))
        return made[key]

    yield get
    for engines in made.values():
        for tm in engines:
            tm.close()


def ahead(tm):
    return on_engine(tm, lambda s: tm.engine.steps_ahead)


def test_switch_and_greedy_equals_transformers(pair, hf_model):
    fast, slow = pair()
    assert fast.engine.async_schedule and not slow.engine.async_schedule
    model = hf_model('gqa')
    before = ahead(fast)
    for n_prompt, seed in ((7, 1), (20, 2)):
        ids = prompt(n_prompt, seed)
        ref = hf_greedy(model, ids, 12)
        assert fresh(fast, ids, 12) == ref == fresh(slow, ids, 12)
    assert ahead(fast) - before >= 20  # decode steps were planned ahead
    assert ahead(slow) == 0


@pytest.mark.parametrize('config', list(CONFIGS))
def test_multi_turn_sessions_equal_synchronous(pair, config):
    fast, slow = pair(config)
    chats = [Chat(fast), Chat(slow)]
    for t in range(4):
        ids = prompt(9 if t == 0 else 4, 300 + t)[0 if t == 0 else 1:]
        outs = [c.turn(ids, 5 + t) for c in chats]
        assert outs[0] == outs[1], f'turn {t}'
    assert chats[0].history == chats[1].history == session_tokens(fast, chats[0].sid)
    # the interactive session keeps the same KV length as after synchronous turns
    infos = [on_engine(tm, lambda s, c=c: s.session_info(c.sid))
             for tm, c in zip((fast, slow), chats)]
    if config == 'plain':
        assert infos[0]['num_cached'] == infos[1]['num_cached'] == len(chats[0].history) - 1


def test_stop_words_and_eos_end_turns_like_synchronous(pair):
    fast, slow = pair()
    ids = prompt(8, 131)
    free = fresh(slow, ids, 20, ignore_eos=False, stop_words=[])
    stop = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    chats = [Chat(fast), Chat(slow)]
    for c in chats:  # the turn ends on the stop word while the next step is already planned
        assert c.turn(ids, 20, ignore_eos=False, stop_words=[stop])[-1] == stop
    more = prompt(5, 132)[1:]
    assert chats[0].turn(more, 6) == chats[1].turn(more, 6)
    assert session_tokens(fast, chats[0].sid) == session_tokens(slow, chats[1].sid)
    with TurboMind(fast.model_path, eos_id=stop, **BASE) as eos_tm:  # the same token as EOS
        assert fresh(eos_tm, ids, 20, ignore_eos=False) == free[:free.index(stop) + 1]


def test_seeded_multi_turn_equals_synchronous(pair):
    """A turn that ends on a stop word drops a draw planned ahead; the session's random stream
    still continues where the synchronous engine's does."""
    fast, slow = pair()
    ids = prompt(6, 93)
    kw = {**SAMPLING, 'ignore_eos': False}  # (ignore_eos drops the stop words, as in v0.0.2)
    probe = fresh(slow, ids, 12, random_seed=7, **kw)
    stop = next(t for i, t in enumerate(probe) if i >= 2 and t not in probe[:i])
    convs = []
    for tm in (fast, slow):
        chat = Chat(tm)
        convs.append([chat.turn(ids, 12, random_seed=7, stop_words=[stop], **kw),
                      chat.turn(prompt(4, 94)[1:], 8, **kw)])
    assert convs[0][0][-1] == stop
    assert convs[0] == convs[1]


@pytest.mark.parametrize('config', list(CONFIGS))
def test_concurrent_requests_equal_synchronous(pair, config):
    fast, slow = pair(config)
    rng = random.Random(11)
    jobs = [(prompt(rng.randint(2, 30), 400 + i), rng.randint(3, 14), rng.random() < 0.3)
            for i in range(14)]
    want = [fresh(slow, ids, n, ignore_eos=not eos) for ids, n, eos in jobs]
    got = [None] * len(jobs)

    def job(i):
        def body():
            ids, n, eos = jobs[i]
            got[i] = fresh(fast, ids, n, ignore_eos=not eos, stream_output=bool(i % 2))
        return body

    run_threads([job(i) for i in range(len(jobs))])
    assert got == want
    state = on_engine(fast, lambda s: (s.num_running(), s.num_waiting(), s.num_outstanding))
    assert state == (0, 0, 0)
    on_engine(fast, lambda s: s.check_invariants())


def test_cancel_mid_pipeline(pair):
    fast, slow = pair()
    ids = prompt(6, 140)
    running = Background(fast, ids, 1500)
    running.wait_tokens(3)
    fast.create_instance().cancel(running.sid)
    assert on_engine(fast, lambda s: s.num_running()) == 0  # finished at once
    partial = running.join()
    assert 3 <= len(partial) < 1500
    assert partial == fresh(slow, ids, len(partial))
    history = session_tokens(fast, running.sid)
    assert history == ids + partial
    info = on_engine(fast, lambda s: s.session_info(running.sid))
    assert info['num_cached'] <= len(history) - 1
    more = prompt(4, 141)[1:]
    out = infer(fast, more, 5, sid=running.sid, start=False, step=len(history))
    assert out == fresh(slow, history + more, 5)
    on_engine(fast, lambda s: s.check_invariants())


def test_repetition_penalty_planned_ahead_equals_transformers(pair, hf_model):
    """The pending token counts as seen (on the device) in the step planned ahead."""
    fast, slow = pair('plain', 'llama')
    model = hf_model('llama')
    ids = prompt(9, 9)  # plain greedy repeats a token three times after it
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, repetition_penalty=1.5, eos_token_id=2,
                             pad_token_id=0)[0, len(ids):].tolist()
    assert ref != hf_greedy(model, ids, 12)  # the penalty matters here
    before = ahead(fast)
    assert fresh(fast, ids, 12, repetition_penalty=1.5) == ref
    assert ahead(fast) - before >= 10
    kw = dict(repetition_penalty=1.3, random_seed=5, top_k=40, top_p=0.9, temperature=0.9)
    chats = [Chat(fast), Chat(slow)]
    for t in range(3):
        more = prompt(6, 180 + t)[0 if t == 0 else 1:]
        assert chats[0].turn(more, 10, **kw) == chats[1].turn(more, 10, **kw), f'turn {t}'


def test_logits_requests_run_synchronously_beside_others(pair):
    fast, slow = pair()
    others = [Background(fast, prompt(5 + i, 150 + i), 60, repetition_penalty=1.2)
              for i in range(2)]
    for o in others:
        o.wait_tokens(1)
    logits = fast.create_instance().decode([prompt(7, 83)])
    assert (logits - slow.create_instance().decode([prompt(7, 83)])).abs().max() < 1e-4
    for i, o in enumerate(others):
        assert o.join() == fresh(slow, prompt(5 + i, 150 + i), 60, repetition_penalty=1.2)
    assert on_engine(fast, lambda s: fast.engine._num_sync_only) == 0


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(pair, monkeypatch):
    fast, slow = pair()
    ids = prompt(6, 160)
    expected = fresh(slow, ids, 6)
    runner = fast.engine.runner
    calls, real_run = [0], runner.run

    def flaky_run(step, timer=None):  # a launch planned ahead fails
        calls[0] += 1
        if step.prev_tokens is not None and calls[0] % 5 == 0:
            raise RuntimeError('injected launch failure')
        return real_run(step, timer)

    monkeypatch.setattr(runner, 'run', flaky_run)
    with pytest.raises(EngineError, match='injected launch failure'):
        fresh(fast, ids, 40)
    monkeypatch.setattr(runner, 'run', real_run)
    assert fresh(fast, ids, 6) == expected
    # the wait for a step's tokens fails: that step and the one planned after it fail
    real_wait, waits = engine_mod._Launched.wait, [0]

    def flaky_wait(self):
        waits[0] += 1
        if waits[0] == 4:
            raise RuntimeError('injected sync failure')
        return real_wait(self)

    monkeypatch.setattr(engine_mod._Launched, 'wait', flaky_wait)
    with pytest.raises(EngineError, match='injected sync failure'):
        fresh(fast, ids, 40)
    monkeypatch.setattr(engine_mod._Launched, 'wait', real_wait)
    assert fresh(fast, ids, 6) == expected
    on_engine(fast, lambda s: s.check_invariants())
    assert on_engine(fast, lambda s: s.num_outstanding) == 0


def test_idle_busy_transitions_deliver_every_notification(pair):
    """Short requests arriving one after another: each caller is woken with its final state
    (none is left waiting for a step that never comes)."""
    fast, slow = pair()
    expected = [fresh(slow, prompt(3 + i % 4, 170 + i), 1 + i % 3) for i in range(12)]
    for i in range(12):
        done = threading.Event()
        out = []

        def body(i=i):
            out.append(fresh(fast, prompt(3 + i % 4, 170 + i), 1 + i % 3))
            done.set()

        threading.Thread(target=body).start()
        assert done.wait(30), f'request {i} was not woken'
        assert out[0] == expected[i]


# ------------------------------------------------------------------------------------------
# Just in time: while step n runs, the loop admits arrivals and plans n+1 shortly before n ends.
# A slow stand-in device (benchmark/profile_engine_host.py): run() returns at once and the wait
# for a step's tokens sleeps until the simulated device is done with it.

DEVICE_MS = 20


def _stand_in(schedule):
    """An engine over the ready-made-logits runner on a 20 ms stand-in device; `steps` gets
    (device end, mixed) per launched step."""
    from benchmark.profile_engine_host import build
    _, engine = build(4, 0, 64, 'cpu', DEVICE_MS, schedule, out_len=400)
    runner, steps, real_run = engine.runner, [], engine.runner.run

    def run(step, timer=None):
        out = real_run(step, timer)
        steps.append((runner.ready_at[-1], step.input_ids.numel() > step.num_decode))
        return out

    runner.run = run
    return engine, steps


def _submit(engine, sid, n, cond):
    from lmdeploy.turbomind.sampling import SamplingParams
    request = engine_mod.Request(sid, SamplingParams(top_k=1), cond)
    ids = [3 + (sid * 7 + i) % 50 for i in range(8)]  # the stand-in's vocabulary is 64
    engine.submit(request, input_ids=ids, request_output_len=n, sequence_end=True,
                  end_id=-1, ignore_eos=True)
    return request


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.005)


def _steps_to_admission(schedule):
    """Submit a request just after step n started on the device (while the loop waits to plan
    n+1, with jit); returns (the step that prefills it) - n."""
    from benchmark.profile_engine_host import simulated_device
    engine, steps = _stand_in(schedule)
    try:
        with simulated_device(engine.runner):
            cond = engine_mod.Wakeup()
            _submit(engine, 1, 300, cond)
            _wait_for(lambda: len(steps) >= 12)
            for _ in range(20):
                cond.wait(0)  # drop a pending notification: the next one is fresh
                waits = engine.jit_waits
                assert cond.wait(5)
                # with jit the callers are woken as the wait to plan starts (right after the
                # previous step's tokens came, as step n starts); otherwise after n+1's launch
                if schedule != 'jit' or engine.jit_waits > waits:
                    break
            else:
                pytest.fail('the loop never waited to plan just in time')
            submitted = time.perf_counter()
            done = engine_mod.Wakeup()
            probe = _submit(engine, 2, 2, done)
            _wait_for(lambda: probe.finished)
            assert probe.error is None and len(probe.output_ids) == 2
        n = next(i for i, (end, _) in enumerate(steps)
                 if end - DEVICE_MS / 1000 <= submitted < end)
        return next(i for i, (_, mixed) in enumerate(steps) if i > n and mixed) - n
    finally:
        engine.call(lambda: engine.scheduler.cancel(1, False))
        engine.close()


def test_jit_admits_a_request_arriving_during_step_n_into_step_n_plus_1():
    assert _steps_to_admission('jit') == 1
    assert _steps_to_admission('ahead') == 2  # planned ahead at once: n+1 was planned already


def test_jit_never_waits_while_idle_or_without_an_estimate(monkeypatch):
    from benchmark.profile_engine_host import simulated_device
    calls = []
    real_delay = engine_mod._Pacer.delay

    def delay(self, running, now):
        result = real_delay(self, running, now)
        calls.append((running.start is not None, bool(self.device.get(running.key)), result))
        return result

    monkeypatch.setattr(engine_mod._Pacer, 'delay', delay)
    engine, steps = _stand_in('jit')
    try:
        with simulated_device(engine.runner):
            done = engine_mod.Wakeup()
            submitted = time.perf_counter()
            request = _submit(engine, 1, 8, done)
            _wait_for(lambda: len(request.output_ids) >= 1)
            # from idle: the first step is launched at once and its token is the next one seen
            assert time.perf_counter() - submitted < 1.5 * DEVICE_MS / 1000
            _wait_for(lambda: request.finished)
            assert calls and calls[0][:2] == (False, False)  # step 1 ran from idle
            assert all(result is None for known, sampled, result in calls
                       if not (known and sampled))
            assert engine.jit_waits == sum(result is not None for *_, result in calls) > 0
            # idle: no step, no wait, no estimate asked for
            before = (len(steps), len(calls), engine.jit_waits)
            time.sleep(0.2)
            assert (len(steps), len(calls), engine.jit_waits) == before
            # and out of idle again: the first token after one step, no wait
            submitted = time.perf_counter()
            request = _submit(engine, 2, 1, engine_mod.Wakeup())
            _wait_for(lambda: request.finished)
            assert request.stamps[0][0] - submitted < 1.5 * DEVICE_MS / 1000
    finally:
        engine.close()


def test_pacer_estimates_lean_safe():
    pacer = engine_mod._Pacer()
    running = engine_mod._Launched(1, np.zeros(0, np.int32), key=('decode', 4), start=10.0)
    assert pacer.delay(running, 10.0) is None  # no device estimate yet
    pacer.add_device(('decode', 4), 0.010)
    assert pacer.delay(running, 10.0) is None  # no host estimate yet
    pacer.add_host('decode', 0.001)
    assert pacer.delay(running, 10.0) == pytest.approx(0.010 - 0.001 - pacer.MARGIN)
    pacer.add_device(('decode', 4), 0.012)  # the shortest recent duration, the median host
    pacer.add_host('decode', 0.002)
    pacer.add_host('decode', 0.0015)
    assert pacer.delay(running, 10.0) == pytest.approx(0.010 - 0.0015 - pacer.MARGIN)
    for _ in range(pacer.SAMPLES):  # only the last SAMPLES count
        pacer.add_host('decode', 0.002)
    pacer.add_host('decode', 0.006)  # one hiccup does not move the estimate
    assert pacer.delay(running, 10.0) == pytest.approx(0.010 - 0.002 - pacer.MARGIN)
    # a prompt's long eager launch counts for mixed steps only, not for the decode steps
    pacer.add_host('mixed', 0.009)
    assert pacer.delay(running, 10.0) == pytest.approx(0.010 - 0.002 - pacer.MARGIN)
    mixed = engine_mod._Launched(2, np.zeros(0, np.int32), key=('mixed', 256), start=10.0)
    pacer.add_device(('mixed', 256), 0.010)
    assert pacer.delay(mixed, 10.0) == pytest.approx(0.010 - 0.009 - pacer.MARGIN)
    assert pacer.delay(running, 10.0075) is None  # too little left to be worth a wait
    running.start = None
    assert pacer.delay(running, 10.0) is None  # the running step's start is unknown
    running.start, running.key = 10.0, ('decode', 8)
    assert pacer.delay(running, 10.0) is None  # no estimate for this kind of step
    pacer.add_device(('decode', 8), 1.0)
    pacer.host.clear()
    pacer.add_host('decode', 0.0)
    assert pacer.delay(running, 10.0) == pytest.approx(0.9)  # capped at 0.9 x the estimate
    pacer.miss()
    assert pacer.extra > 0 and pacer.delay(running, 10.0) < 1.0 - pacer.MARGIN
    assert [engine_mod._bucket(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]


class SlowDevice:
    """The real forward behind a device that takes `ms` per step: it runs on the host inside
    run() (the CPU path is synchronous) and its tokens are handed over only once the simulated
    device is done (`wait_step`, the token wait; see profile_engine_host.simulated_device)."""

    def __init__(self, runner, ms):
        self.real_run, self.ms = runner.run, ms
        self.busy_until = 0.0
        self.ready_at = collections.deque()

    def run(self, step, timer=None):
        self.busy_until = max(time.perf_counter(), self.busy_until) + self.ms / 1000
        self.ready_at.append(self.busy_until)
        return self.real_run(step)

    def wait_step(self):
        delay = self.ready_at.popleft() - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


@pytest.mark.parametrize('config', list(CONFIGS))
def test_just_in_time_arrivals_equal_synchronous(pair, config, monkeypatch):
    """Staggered arrivals admitted while a step runs (the loop waits to plan the next one):
    every output is still the synchronous engine's."""
    from benchmark.profile_engine_host import simulated_device
    fast, slow = pair(config)
    rng = random.Random(23)
    jobs = [(prompt(rng.randint(2, 24), 500 + i), rng.randint(3, 12), rng.random() * 0.3)
            for i in range(8)]
    want = [fresh(slow, ids, n) for ids, n, _ in jobs]
    got = [None] * len(jobs)
    device = SlowDevice(fast.engine.runner, 25)
    monkeypatch.setattr(fast.engine.runner, 'run', device.run)
    monkeypatch.setattr(fast.engine, 'jit_schedule', True)
    waits = fast.engine.jit_waits
    sys.setswitchinterval(0.005)  # Python's default (conftest restores whatever it was)
    intervals = []
    set_interval = sys.setswitchinterval

    def recording(value):
        intervals.append(value)
        set_interval(value)
    monkeypatch.setattr(sys, 'setswitchinterval', recording)

    def job(i):
        def body():
            ids, n, at = jobs[i]
            time.sleep(at)
            got[i] = fresh(fast, ids, n, stream_output=bool(i % 2))
        return body

    with simulated_device(device):
        fresh(fast, prompt(6, 499), 24)  # settle the estimates
        run_threads([job(i) for i in range(len(jobs))])
    # each wait lowered the GIL switch interval (its end would be late) and restored it after
    low = fast.engine.JIT_SWITCH_INTERVAL
    assert intervals and intervals == [low, 0.005] * (len(intervals) // 2)
    assert sys.getswitchinterval() == pytest.approx(0.005)
    assert got == want
    assert fast.engine.jit_waits > waits
    assert on_engine(fast, lambda s: (s.num_running(), s.num_waiting(), s.num_outstanding)) == (
        0, 0, 0)
    on_engine(fast, lambda s: s.check_invariants())


def test_jit_stops_waiting_once_nothing_was_submitted_for_a_while(monkeypatch):
    """A batch that only decodes (nothing submitted for JIT_ACTIVE_S) plans each step at once:
    the wait admits nobody and a late wake would stall every row; a new submit restarts it."""
    from benchmark.profile_engine_host import simulated_device
    monkeypatch.setattr(engine_mod.Engine, 'JIT_ACTIVE_S', 0.15)
    engine, steps = _stand_in('jit')
    try:
        with simulated_device(engine.runner):
            long = _submit(engine, 1, 400, engine_mod.Wakeup())  # 400 x 20 ms steps
            _wait_for(lambda: engine.jit_waits >= 3)
            time.sleep(0.25)  # past the window: no more waits
            waits, n = engine.jit_waits, len(steps)
            _wait_for(lambda: len(steps) >= n + 8)
            assert engine.jit_waits == waits
            _submit(engine, 2, 4, engine_mod.Wakeup())  # an arrival: waits again
            _wait_for(lambda: engine.jit_waits > waits)
            assert not long.finished
    finally:
        engine.close()


def test_close_while_waiting_to_plan_hands_over_and_fails_the_rest():
    from benchmark.profile_engine_host import simulated_device
    engine, steps = _stand_in('jit')
    with simulated_device(engine.runner):
        request = _submit(engine, 1, 300, engine_mod.Wakeup())
        _wait_for(lambda: engine.jit_waits >= 3)
        engine.close()  # most of a step is the wait to plan the next one
    assert not engine._thread.is_alive()
    assert request.finished and isinstance(request.error, EngineError)
    assert 'closed' in str(request.error)
    # the step on the device was the last one launched; its tokens were handed over before
    # the request failed
    assert len(request.output_ids) == len(steps)
    with pytest.raises(EngineError):
        _submit(engine, 2, 1, engine_mod.Wakeup())


def test_scheduling_keys_reach_the_engine(workspace):
    tm = TurboMind(workspace('gqa'), jit_schedule=False, admit_horizon=-1, **BASE)
    try:
        assert not tm.engine.jit_schedule and tm.engine.async_schedule
        assert tm.config.admit_horizon == -1
    finally:
        tm.close()
    tm = TurboMind(workspace('gqa'), **BASE)
    try:
        assert tm.engine.jit_schedule and tm.config.admit_horizon == 32
    finally:
        tm.close()
