"""The engine: one thread that runs the step loop over the persistent batch.

    plan = scheduler.schedule()               # C++ core: admit, allocate blocks, emit the flat plan
    launched = self._launch(plan)             # data plane: forward + sample, queued on the device
    events = scheduler.update(launched.wait())  # C++ core: append, stop checks, finish or park

Pipelined ("async scheduling", `EngineConfig.async_schedule`): the device should never wait for
the host, so step n+1 is planned and launched before step n's tokens reach the host:

    plan = scheduler.schedule(ahead=True)     # step n (A) is still outstanding on the device
    launched = self._launch(plan, prev=A)     # forward + sampler queued; step.prev_tokens = A's
    self._commit(A)                           # wait for A's tokens, update(A), dispatch
    A = launched

Rows of requests whose token is pending in A feed placeholders that the forward resolves from
A's sampled tokens on the device (step_input.py); the scheduler commits plans oldest first and
drops the newer row of a request that A's tokens finish (scheduler.h). The sampled tokens go to
the host by an asynchronous copy queued right after the sampler, so waiting for A never waits
for step n+1. A repetition penalty row counts its pending token as seen on the device (its
history on the host lacks it until A is committed). A step runs synchronously (planned after
the previous one is committed and committed at once) while any live request wants logits
(`decode()`, read on the host per step), and always with tensor parallelism (the other ranks
would need prev_tokens) or with async_schedule off.

Just in time: planning step n+1 as soon as step n starts would leave a request that arrives
while n runs waiting a whole extra step (n+1 is already planned without it). So, while n runs,
the loop keeps running queued commands (admitting arrivals) and plans n+1 only shortly before n
is expected to end:

    plan n+1 at  start(n) + device(n) - host - margin

start(n) is when the loop saw step n-1's tokens (n was queued behind n-1, so the device went
straight on to it); device(n) the shortest of the recent device durations of steps like n
(decode-only by batch-size bucket, mixed by token bucket), measured as the interval between
consecutive token arrivals while the pipeline stays full; host the median of the recent
plan-to-launched times of steps of n's kind (`_Pacer`). No wait when step n's start or kind
has no measurement yet, when the wait would be under `_Pacer.MIN_WAIT`, while requests wait for
admission, after a failed step, in synchronous steps, or when no request was submitted in the
last `JIT_ACTIVE_S` (1 s): the wait only pays when prompts arrive, while a wait that ends late
(a miss) stalls every running row, so a batch that only decodes (B1, a static batch) plans at
once. A step that ended before its successor
was launched (a miss: the device idled) grows the margin until the misses stop, and its
successor's successor is planned at once. The `jit_schedule` config key (on by default)
turns this on. A thread that times out of the wait gets the GIL back only after the holder's
switch interval (5 ms by default), so each wait lowers the interval to 0.5 ms
(`JIT_SWITCH_INTERVAL`) and restores it when it ends (left low, every other thread would cut
into the step's launch and sampling), and TurboMind freezes its start-up heap out of the
garbage collector (a full collection stops every thread for 50-100 ms). On the H100 (session
7, benchmark/NOTES.md) JIT took B4's TTFT p50 from 23.0 to 18.5 ms with the p99s unchanged,
B1's first token of a 128-token prompt from 7.8 to 6.9 ms, and left B1's and bs64's tokens per
second as they were; B1's per-token p99 moved with the machine (1.05-2.05 x p50) with and
without it.

Callers on any thread reach the loop only through `submit` and `call` (both queue a command
the loop runs between steps) and through the `Request` objects they hand in, which the loop
fills and signals. The scheduler, the runner and the request table belong to the loop thread.

Host work per step is kept flat in the batch size: sampling parameters live in per-slot arrays
(`SamplingSlots`), the sampling of steps up to 64 rows replays a CUDA graph when the runner
has them (sampler_graphs.py: a few host ops instead of ~50 launches), event arrays cross to
Python once per step, and the waiting callers are woken once per `cond` per step. Those
wake-ups are deferred until the next step's forward and sampling are launched: the callers
(often hundreds of threads) then run while the device works and the loop waits for the sampled
tokens with the GIL released, instead of fighting the loop for the GIL while it launches
kernels (when the loop waits to plan just in time, they are woken as that wait starts). A
request's state (tokens, finished, reason) is always updated at once; only the notification
moves, by the next step's launch time, and it is never held while the loop is idle.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import math
import queue
import statistics
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import _turbomind as _tm
from .errors import EngineError, EngineFailure, InvalidRequest, error_for
from .model_runner import ModelRunner
from .sampling import RequestRng, Sampler, SamplingParams
from .sampling_slots import SamplingSlots
from .step_input import StepInput
from .step_timer import StepTimer

logger = logging.getLogger('lmdeploy.turbomind')

_NO_TOKENS = np.zeros(0, dtype=np.int32)
# decode() uses session ids from here up, so it never touches a caller's session.
PRIVATE_SESSION_BASE = 1 << 63

_LIVE_ENGINES: 'weakref.WeakSet[Engine]' = weakref.WeakSet()


@atexit.register
def _close_live_engines():
    # Interpreter shutdown with the loop thread still inside torch aborts the process.
    for engine in list(_LIVE_ENGINES):
        engine.close()


@dataclass(eq=False)
class Request:
    """One request's state, written by the engine thread and read by its caller.

    The caller waits on `cond` (shared by the requests of one call) until `version` moves.
    The engine only calls ``with cond: cond.notify_all()``, once per step per `cond`, so any
    object with that shape can stand in for a `threading.Condition` (an asyncio bridge, say).
    `stamps` gets ``(time.perf_counter(), len(output_ids))`` each time tokens are handed over:
    when each token became available to the caller, without the caller having to wake for it.
    With `stream` False the caller is only woken when the request finishes.
    """
    session_id: int
    params: SamplingParams
    cond: threading.Condition
    random_seed: Optional[int] = None
    want_logits: bool = False
    stream: bool = True
    handle: int = 0
    output_ids: List[int] = field(default_factory=list)
    logits: List[torch.Tensor] = field(default_factory=list)
    finished: bool = False
    reason: str = ''
    error: Optional[Exception] = None
    version: int = 0
    stamps: List[tuple] = field(default_factory=list)
    submitted: float = 0.0  # perf_counter at submit
    first_queued: float = 0.0  # when its first step was queued on the device (timed engines)
    # engine-thread only
    rng: Optional[RequestRng] = None
    slot: int = -1  # row of the engine's SamplingSlots while it samples
    sync_only: bool = False  # its steps cannot be planned ahead (it wants logits)

    def publish(self):
        with self.cond:
            self.version += 1
            self.cond.notify_all()


class Wakeup:
    """The cheapest `cond` for one waiting thread: a lock used as an auto-reset event.

    The engine's ``with cond: cond.notify_all()`` releases it; `wait()` blocks (in C, GIL
    released) until then and re-arms it. Notifications made while nobody waits are kept (one),
    so a state change is never missed: wake, read the requests, wait again.
    """
    __slots__ = ('_lock',)

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def notify_all(self):
        try:
            self._lock.release()
        except RuntimeError:  # already released: a notification is pending
            pass

    def wait(self, timeout: float = -1) -> bool:
        return self._lock.acquire(timeout=timeout)


@dataclass(eq=False)
class _Launched:
    """A step queued on the device whose sampled tokens are not committed yet."""
    step: int
    row_handles: np.ndarray
    tokens: Optional[torch.Tensor] = None  # sampled, on the device (int32 [S]); None: no samples
    host: Optional[torch.Tensor] = None  # their host copy, complete once `ready` is
    ready: Optional[object] = None  # a CUDA event after the copy; None on the CPU
    key: tuple = ()  # what predicts its device time (_Pacer.key)
    queued: float = 0.0  # when its device work was all queued (perf_counter)
    start: Optional[float] = None  # when the device started it, if known: the previous tokens
    arrived: Optional[float] = None  # when its tokens reached the host (timed engines)
    jit: bool = False  # the loop waited to plan the step after it (just in time)

    def pending(self) -> Optional[bool]:
        """Whether its tokens are still on their way (the device is on it); None: cannot tell
        without waiting (the CPU)."""
        if self.ready is None:
            return None
        return not self.ready.query()

    def wait(self) -> np.ndarray:
        if self.tokens is None:
            return _NO_TOKENS
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.numpy()


class _Pacer:
    """When to plan the next step (just in time): recent device step durations by kind and the
    host's plan-to-launched times. Planning early costs a request arriving after the plan one
    step; planning late idles the device (a miss, which grows the margin until misses stop).
    Device: the shortest of the last `SAMPLES` of the step's kind (the safe side); host: the
    median of the last `SAMPLES` steps of the running step's kind (decode-only or mixed), taken
    as the kind of the step about to be planned: a prompt's eager launch (10+ ms of host time)
    must not stop the waits of the decode steps after it. The median, not the longest: under
    api_server the loop's host time has a tail from the server's threads holding the GIL (B4
    on the H100: p50 1.2, p90 1.8, p99 2.7 ms), and the longest of 8 planned ~0.6 ms earlier
    than needed; with the median, B4's TTFT p50 / p99 were 18.4 / 33.9 ms against 18.8 / 35.7
    over four A/B pairs, misses and ITL unchanged (benchmark/NOTES.md, session 9)."""
    SAMPLES = 8
    MARGIN = 0.4e-3  # the next step is queued this long before the device would go idle
    MAX_EXTRA = 3e-3  # misses add up to this much more
    MIN_WAIT = 0.2e-3  # shorter waits are not worth it
    MAX_WAIT = 0.9  # of the running step's estimate
    BLOCKED = 20e-6  # without a CUDA event to ask: a token wait this long waited for the device

    def __init__(self):
        self.device: Dict[tuple, deque] = {}
        self.host: Dict[str, deque] = {}  # by kind: 'decode' | 'mixed'
        self.extra = 0.0  # margin added after misses

    @staticmethod
    def key(plan) -> tuple:
        if plan.num_tokens == plan.num_decode:
            return ('decode', _bucket(plan.batch_size))
        return ('mixed', _bucket(plan.num_tokens))

    def add_device(self, key: tuple, seconds: float):
        samples = self.device.get(key)
        if samples is None:
            samples = self.device[key] = deque(maxlen=self.SAMPLES)
        samples.append(seconds)

    def add_host(self, kind: str, seconds: float):
        samples = self.host.get(kind)
        if samples is None:
            samples = self.host[kind] = deque(maxlen=self.SAMPLES)
        samples.append(seconds)

    def hit(self):
        self.extra *= 0.95

    def miss(self):
        self.extra = min(2 * self.extra + self.MARGIN, self.MAX_EXTRA)

    def delay(self, running: _Launched, now: float) -> Optional[float]:
        """Seconds from `now` until the step after `running` should be planned; None: now."""
        samples = self.device.get(running.key)
        host = self.host.get(running.key[0])
        if running.start is None or not samples or not host:
            return None
        device = min(samples)
        delay = (running.start + device - statistics.median(host) - self.MARGIN - self.extra
                 - now)
        delay = min(delay, self.MAX_WAIT * device)
        return delay if delay >= self.MIN_WAIT else None


def _bucket(n: int) -> int:
    """n rounded up to a power of two."""
    return 1 << max(0, int(n) - 1).bit_length()


class Engine:
    """The step loop. `runner` is rank 0's ModelRunner; the scheduler is sized from it."""
    JIT_SWITCH_INTERVAL = 0.5e-3  # sys.setswitchinterval during a just-in-time wait (None: keep)
    JIT_ACTIVE_S = 1.0  # wait to plan just in time only this long after the last submit

    def __init__(self, runner: ModelRunner):
        cfg = runner.cfg
        self.runner = runner
        self.scheduler = _tm.Scheduler(
            num_blocks=runner.num_blocks, block_size=cfg.block_size,
            max_batch_size=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens,
            session_len=cfg.session_len, vocab_size=cfg.vocab_size, start_id=cfg.start_id,
            end_id=cfg.end_id, chunked_prefill=cfg.chunked_prefill,
            admit_horizon=cfg.admit_horizon,
            max_mixed_prefill_tokens=cfg.max_mixed_prefill_tokens)
        # The runner's CUDA graphs of the sampler when it has them (CUDA with graphs on; they
        # return int32 tokens), else the eager sampler: the same tokens either way.
        sampler_graphs = getattr(runner, 'sampler_graphs', None)
        self.sampler = (sampler_graphs if sampler_graphs is not None
                        else Sampler(kernels=getattr(runner, 'kernels', None)))
        self.slots = SamplingSlots(cfg.max_batch_size)
        # Plan ahead only with one rank (the others would need prev_tokens) and when enabled.
        self.async_schedule = (bool(getattr(cfg, 'async_schedule', True))
                               and getattr(runner, 'tp', 1) == 1)
        self._launched: Optional[_Launched] = None  # the step on the device, not yet committed
        self._num_sync_only = 0  # live requests whose steps must not be planned ahead
        self.steps_ahead = 0  # steps planned while the previous one was on the device
        # Plan a step ahead only shortly before the device needs it (module docstring).
        self.jit_schedule = bool(getattr(cfg, 'jit_schedule', True))
        self.jit_waits = 0  # waits to plan just in time
        self.jit_misses = 0  # ... after which the device had finished before the launch
        self._last_submit = -math.inf  # when a caller last submitted a request (any thread)
        self._pacer = _Pacer()
        self._failed = False  # a step failed since the last plan: plan the next one at once
        self._closing = False  # close() came while waiting to plan
        self._wakes: Dict[int, threading.Condition] = {}  # deferred notifications, by id(cond)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: Dict[int, Request] = {}  # handle -> request in the scheduler
        self._session_rng: Dict[int, tuple] = {}  # session_id -> saved RequestRng state
        self._private_ids = itertools.count(PRIVATE_SESSION_BASE)
        self._dead: Optional[Exception] = None
        self.timer: Optional[StepTimer] = None  # set one to time the steps' phases
        self._post_lock = threading.Lock()  # _post vs the loop's shutdown: nothing is lost
        self._thread = threading.Thread(target=self._loop, name='turbomind-engine', daemon=True)
        self._thread.start()
        _LIVE_ENGINES.add(self)

    # ----------------------------------------------------------------------------------------
    # Caller side (any thread)

    def submit(self, request: Request, **core_args) -> None:
        """Queue `request`; `core_args` go to the scheduler's submit (input_ids, flags, ...)."""
        request.submitted = self._last_submit = time.perf_counter()
        command = lambda: self._submit(request, core_args)  # noqa: E731
        command.request = request  # failed by the loop's shutdown if it never runs
        self._post(command)

    def call(self, fn: Callable):
        """Run `fn()` on the engine thread between steps and return its result."""
        future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

        run.future = future  # failed by the loop's shutdown if it never runs
        self._post(run)
        return future.result()

    def cancel(self, session_id: int, end: bool = False) -> int:
        """STOP (v0.0.2): a running request finishes with reason 'cancel'; returns the code."""

        def run():
            code = self.scheduler.cancel(session_id, end)
            if end:
                self._session_rng.pop(session_id, None)
            return code

        return self.call(run)

    def abort(self, error: EngineFailure):
        """Stop the loop with `error` (any thread): every request fails with it."""

        def run():
            raise error

        try:
            self._post(run)
        except EngineError:  # already stopped
            pass

    def cancel_nowait(self, session_id: int) -> None:
        """Queue a cancel of the session's running request and return at once (an event loop
        cannot wait for a step); a request that is not running any more is left alone."""
        self._post(lambda: self.scheduler.cancel(session_id, False))

    def private_session_id(self) -> int:
        return next(self._private_ids)

    def close(self):
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join()

    def _post(self, command: Callable):
        with self._post_lock:
            if isinstance(self._dead, EngineFailure):
                raise type(self._dead)(str(self._dead))
            if self._dead is not None:
                raise EngineError(f'the engine has stopped: {self._dead}')
            self._commands.put(command)

    # ----------------------------------------------------------------------------------------
    # Engine thread

    def _loop(self):
        try:
            while not self._closing and self._drain(block=self._idle()):
                self._step()
            if self._launched is not None:  # its tokens are handed over before the requests fail
                self._commit(self._launched)
                self._launched = None
            self._wake_callers()
            dead = EngineError('the engine was closed')
        except EngineFailure as e:
            logger.error('%s', e)
            dead = e
        except BaseException as e:  # a bug in the loop itself: fail everyone, never hang them
            logger.exception('engine loop failed')
            dead = e
        with self._post_lock:  # from here on _post raises, so the queue only shrinks
            self._dead = dead
        error = dead if isinstance(dead, EngineFailure) else EngineError(
            f'the engine has stopped: {dead}')
        while True:  # commands queued behind close() (or behind the failure) never run
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if hasattr(command, 'request'):
                command.request.error = error
                command.request.finished = True
                command.request.publish()
            elif hasattr(command, 'future'):
                command.future.set_exception(error)
        for request in list(self._requests.values()):
            request.error = request.error or error
            request.finished = True
            request.publish()
        self._requests.clear()

    def _idle(self) -> bool:
        scheduler = self.scheduler
        if self._launched is not None or scheduler.num_running() or scheduler.num_waiting():
            return False
        self._wake_callers()  # nothing will run: deliver before blocking
        return True

    def _drain(self, block: bool) -> bool:
        """Run queued commands (waiting for one when idle); False once close() was called."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while command is not None:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
        return False

    def _submit(self, request: Request, core_args: dict):
        try:
            if request.random_seed is not None:
                request.rng = RequestRng(request.random_seed)
            elif (not core_args.get('sequence_start', True)
                  and request.session_id in self._session_rng):
                request.rng = RequestRng.from_state(self._session_rng[request.session_id])
            else:
                request.rng = RequestRng()
            request.handle = self.scheduler.submit(request.session_id, **core_args)
        except Exception as e:  # noqa: BLE001
            # E.g. arguments the binding cannot convert (an id beyond 64 bits): this request
            # fails alone; raising here would end the loop and leave its caller waiting.
            if isinstance(e, (TypeError, ValueError, OverflowError)):
                request.error = InvalidRequest(
                    f'request for session {request.session_id!r} rejected: '
                    f'{str(e).splitlines()[0]}')
            else:
                logger.exception('submit failed')
                request.error = EngineError(f'submit failed: {e}')
            request.finished = True
            request.publish()
            return
        self._requests[request.handle] = request
        request.sync_only = request.want_logits
        self._num_sync_only += request.sync_only
        # A rejected request gets its error event from the next update().

    def _step(self):
        """One step: plan (ahead of the outstanding step when it may), launch, then commit the
        outstanding step. Every call ends with an update(), or with a step left outstanding
        whose commit (next call) brings the events."""
        scheduler, timer = self.scheduler, self.timer
        if timer:
            timer.begin()
        if self._launched is not None and self._plan_ahead():
            if not self._wait_to_plan(self._launched):
                self._closing = True  # close() came while waiting: the loop ends
                return
            if timer:
                timer.lap('jit_wait')
        self._failed = False
        planned_at = time.perf_counter()
        prev, self._launched = self._launched, None
        if prev is not None and not self._plan_ahead():
            self._commit(prev)
            prev = None
        plan = scheduler.schedule(ahead=prev is not None)
        self.steps_ahead += prev is not None
        if timer:
            timer.lap('schedule')
        launched = None
        if plan.num_tokens:
            try:
                launched = self._launch(plan, prev, timer)
                if prev is not None:  # the host time that must end before `prev` does
                    self._pacer.add_host(launched.key[0], launched.queued - planned_at)
            except EngineFailure:  # the data plane cannot go on: the loop stops
                raise
            except Exception as e:  # noqa: BLE001 - the step fails, its requests fail, we go on
                logger.exception('step %d failed', plan.step)
                scheduler.discard_plan()
                self._fail_rows(plan.row_handles, e)
        if launched is None:
            self._wake_callers()  # no device work to overlap with
        if prev is not None:
            launched = self._commit(prev, launched)
        elif launched is None:
            self._commit(None)  # the events of submits and cancels
        if launched is not None and not self._plan_ahead():
            self._commit(launched)
            launched = None
        self._launched = launched
        if timer:
            timer.end(plan.batch_size, plan.num_tokens == plan.num_decode)

    def _plan_ahead(self) -> bool:
        return self.async_schedule and not self._num_sync_only

    def _wait_to_plan(self, running: _Launched) -> bool:
        """Run queued commands (admit arrivals) until it is time to plan the step after
        `running`, the step on the device (module docstring); False once close() was called."""
        now = time.perf_counter()
        if (not self.jit_schedule or self._failed or self.scheduler.num_waiting()
                or now - self._last_submit > self.JIT_ACTIVE_S):
            return True
        delay = self._pacer.delay(running, now)
        if delay is None:
            return True
        deadline = now + delay
        running.jit = True
        self.jit_waits += 1
        if self.timer:
            self.timer.count('jit_waits')
        # A thread that times out of a wait gets the GIL back only when the holder drops it,
        # after up to the switch interval (5 ms by default): a whole decode step late. So the
        # interval is short while the loop waits, and restored once it holds the GIL again:
        # left short, every other thread would cut into the step's launch and sampling every
        # 0.5 ms (on the H100 the host forward went from 279 to 683 us per step at B4).
        interval, restore = self.JIT_SWITCH_INTERVAL, sys.getswitchinterval()
        lowered = bool(interval) and restore > interval
        if lowered:
            sys.setswitchinterval(interval)
        try:
            self._wake_callers()  # they run while the loop waits
            commands = self._commands
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    return True
                try:
                    command = commands.get(timeout=remaining)
                except queue.Empty:
                    return True
                if command is None:
                    return False
                command()
        finally:
            if lowered:
                sys.setswitchinterval(restore)

    def _commit(self, launched: Optional[_Launched], newer: Optional[_Launched] = None
                ) -> Optional[_Launched]:
        """Wait for `launched`'s tokens, commit its plan (the oldest outstanding) and dispatch
        the events; None: nothing outstanding, only the events. Returns `newer` (the step
        launched after it), or None when a failure here dropped it too."""
        scheduler, timer = self.scheduler, self.timer
        tokens = _NO_TOKENS
        if launched is not None:
            try:
                pending = launched.pending()
                waited = time.perf_counter()
                tokens = launched.wait()
                arrived = launched.arrived = time.perf_counter()
                if pending is None:  # a wait that took a while waited for the device
                    pending = arrived - waited >= _Pacer.BLOCKED
                self._pace(launched, newer, arrived, pending)
            except EngineFailure:
                raise
            except Exception as e:  # noqa: BLE001 - as a failing launch; newer reads its tokens
                logger.exception('step %d failed', launched.step)
                if newer is not None:
                    scheduler.discard_plan()
                    self._fail_rows(newer.row_handles, e)
                    newer = None
                scheduler.discard_plan()
                self._fail_rows(launched.row_handles, e)
                tokens = _NO_TOKENS
            if timer:
                timer.lap('sync')
        events = scheduler.update(tokens)
        for warning in scheduler.take_warnings():
            logger.warning(warning)
        if timer:
            timer.lap('update')
        self._dispatch(events, launched)
        if timer:
            timer.lap('dispatch')
        return newer

    def _pace(self, launched: _Launched, newer: Optional[_Launched], arrived: float,
              blocked: bool):
        """`launched`'s tokens arrived: measure its device time, date `newer`'s start."""
        pacer = self._pacer
        if blocked:  # the device was still on it: the tokens arrived as it finished
            if launched.start is not None:
                pacer.add_device(launched.key, arrived - launched.start)
                if self.timer:  # e.g. a prompt's mixed step as the server meets it
                    self.timer.observe(f'device_{launched.key[0]}', arrived - launched.start)
            if newer is not None:  # queued before that, so the device went straight on to it
                newer.start = arrived
            if launched.jit:
                pacer.hit()
        elif launched.jit:  # done before the step after it was queued: the device idled
            self.jit_misses += 1
            pacer.miss()
            if self.timer:
                self.timer.count('jit_misses')

    def _launch(self, plan, prev: Optional[_Launched], timer=None) -> _Launched:
        """Queue the plan's forward and sampler on the device (its placeholders read `prev`'s
        tokens) and the copy of the sampled tokens to the host."""
        num_samples, num_logits = plan.num_samples, plan.num_logits
        sample_idx = plan.sample_idx
        if num_logits:
            sample_idx = np.concatenate([sample_idx, plan.logits_idx])
        step = StepInput(
            input_ids=torch.from_numpy(plan.input_ids), positions=torch.from_numpy(plan.positions),
            cu_seqlens=torch.from_numpy(plan.cu_seqlens), kv_lens=torch.from_numpy(plan.kv_lens),
            block_table=torch.from_numpy(plan.block_table),
            slot_mapping=torch.from_numpy(plan.slot_mapping),
            sample_idx=torch.from_numpy(sample_idx), max_q_len=plan.max_q_len,
            max_kv_len=plan.max_kv_len, num_decode=plan.num_decode,
            prev_tokens=prev.tokens if prev is not None else None)
        launched = _Launched(plan.step, plan.row_handles.copy(), key=_Pacer.key(plan))
        if timer:
            timer.lap('step_input')
        slot_idx = self._sampling_slots(plan.sample_handles) if num_samples else None
        if timer:
            timer.lap('sample_prep')
        logits = self.runner.run(step, timer)
        if timer:
            timer.lap('forward')  # eager forward; with graphs, what follows the replay
        if num_logits:  # only in synchronous steps (a logits request is sync_only)
            extra = logits[num_samples:].cpu()
            for j, handle in enumerate(plan.logits_handles.tolist()):
                self._requests[handle].logits.append(extra[j])
        if num_samples:
            batch = self.slots.batch(slot_idx, logits.device)
            if batch.any_penalty and prev is not None and prev.tokens is not None:
                _count_pending_as_seen(batch, plan, prev.tokens)
            if timer:
                timer.lap('sample_batch')
                replays = getattr(self.sampler, 'replays', None)  # SamplerGraphs' counter
            # the sampler graphs return int32 tokens already: no copy then
            tokens = self.sampler(logits[:num_samples], batch).to(torch.int32)
            if timer:
                if replays is not None:  # did the graphs serve the step?
                    timer.count('sampler_replays' if self.sampler.replays > replays
                                else 'sampler_fallbacks')
                timer.lap('sample')
            self.slots.advance(slot_idx, batch)
            launched.tokens = tokens
            launched.host, launched.ready = _copy_to_host(tokens)
            if timer:
                timer.lap('sample_copy')
        launched.queued = time.perf_counter()
        if timer and plan.num_tokens != plan.num_decode:  # a prompt's first step is mixed
            requests = self._requests
            for handle in plan.row_handles.tolist():
                request = requests.get(handle)
                if request is not None and not request.first_queued:
                    request.first_queued = launched.queued
        self._wake_callers()  # the previous step's callers run while the device works
        if timer:
            timer.lap('wake')
        return launched

    def _observe_first_token(self, request: Request, launched: Optional[_Launched], now: float):
        timer = self.timer
        timer.observe('ttft_queue', request.first_queued - request.submitted)
        timer.observe('ttft_step', now - request.first_queued)
        if launched is None or launched.queued != request.first_queued:
            return  # not its first step's tokens (e.g. a prompt in chunks)
        if launched.start is not None:  # the step ahead of it on the device, then its own
            timer.observe('ttft_step_ahead', launched.start - launched.queued)
            timer.observe('ttft_step_device', launched.arrived - launched.start)
        timer.observe('ttft_step_handover', now - launched.arrived)

    def _sampling_slots(self, handles: np.ndarray) -> np.ndarray:
        """The slot of each sampling row (int64); rows that sample for the first time get one."""
        requests = self._requests
        slots = []
        for h in handles.tolist():
            r = requests[h]
            if r.slot < 0:
                history = None
                if r.params.repetition_penalty != 1.0:  # the whole sequence, prompt included
                    history = self.scheduler.session_info(r.session_id)['tokens']
                r.slot = self.slots.add(r.params, r.rng, history)
            slots.append(r.slot)
        return np.array(slots, dtype=np.int64)

    def _fail_rows(self, row_handles: np.ndarray, error: Exception):
        self._failed = True
        for handle in set(row_handles.tolist()):
            request = self._requests.get(handle)
            if request is not None:
                request.error = EngineError(f'the step running this request failed: {error}')
                self.scheduler.cancel(request.session_id, False)

    def _dispatch(self, events, launched: Optional[_Launched] = None):
        """Hand each event to its request (`launched`: the step that made its tokens); its
        caller is woken later (`_wake_callers`)."""
        if not len(events.handles):
            return
        handles = events.handles.tolist()
        offsets = events.offsets.tolist()
        tokens = events.tokens.tolist()
        finished = events.finished.tolist()
        requests, slots, wakes = self._requests, self.slots, self._wakes
        now = time.perf_counter()
        for i, handle in enumerate(handles):
            request = requests.get(handle)
            if request is None:
                continue
            a, b = offsets[i], offsets[i + 1]
            if b > a:
                if not request.output_ids and self.timer and request.first_queued:
                    self._observe_first_token(request, launched, now)
                new = tokens[a:b]
                request.output_ids.extend(new)
                request.stamps.append((now, len(request.output_ids)))
                if request.slot >= 0 and slots.has_history(request.slot):
                    slots.extend_history(request.slot, new)
            if finished[i]:
                code = int(events.codes[i])
                if code and request.error is None:
                    request.error = error_for(code, events.messages[i])
                request.reason = _tm.FINISH_REASONS[int(events.reasons[i])]
                del requests[handle]
                self._num_sync_only -= request.sync_only
                self._release(request)
                request.finished = True
            request.version += 1
            if request.stream or request.finished:
                wakes[id(request.cond)] = request.cond

    def _wake_callers(self):
        """Notify every `cond` whose requests changed since the last call."""
        if not self._wakes:
            return
        wakes, self._wakes = self._wakes, {}
        for cond in wakes.values():
            with cond:
                cond.notify_all()

    def _release(self, request: Request):
        """A finished request gives its sampling slot back and parks its random stream."""
        if request.slot >= 0:
            self.slots.remove(request.slot)
            # One draw per token it got: a draw for a row of a later step that was dropped (the
            # request finished before it was committed) does not count, as in synchronous steps.
            request.rng.counter += len(request.output_ids)
            request.slot = -1
        self._park_rng(request)

    def _park_rng(self, request: Request):
        """Keep a finished turn's random stream for the session's next turn (v0.0.2 7.3)."""
        if request.error is None and self.scheduler.session_info(request.session_id) is not None:
            self._session_rng[request.session_id] = request.rng.state()
        else:
            self._session_rng.pop(request.session_id, None)


def _copy_to_host(tokens: torch.Tensor):
    """(host tensor, event): an asynchronous copy queued now on the device's stream, so that
    waiting for it later does not wait for the work queued after it."""
    if tokens.device.type != 'cuda':
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tokens.device))
    return host, ready


def _count_pending_as_seen(batch, plan, prev_tokens: torch.Tensor):
    """The repetition penalty's seen ids of rows whose last token is pending (a placeholder for
    an entry of `prev_tokens`) get that token as one more column, filled on the device."""
    last = plan.input_ids[plan.sample_idx]
    pending = last < 0
    if not pending.any():
        return
    ids, lens = batch.seen_ids, batch.seen_lens
    device = ids.device
    src = torch.from_numpy(np.where(pending, -1 - last, 0).astype(np.int64)).to(device)
    mask = torch.from_numpy(pending).to(device)
    col = torch.where(mask, prev_tokens.to(device, torch.int64).index_select(0, src),
                      torch.full_like(src, -1))
    batch.seen_ids = torch.cat([ids, col.to(ids.dtype)[:, None]], dim=1)
    # padding between a row's own length and the new column holds -1, which is never counted
    batch.seen_lens = torch.where(mask, torch.full_like(lens, ids.shape[1] + 1), lens)
