"""Tensor parallelism: one process per rank. Rank 0 lives in the caller's process, owns the
scheduler and sends every step's plan to ranks 1..tp-1, which run the same forward on their
shard; activations meet in all-reduces (after `wo` and `w2`) and the vocab-parallel LM head's
all-gather (distributed.py: NCCL on CUDA, gloo on CPU).

    runner = TensorParallelRunner(cfg, tp=2)      # starts the other ranks, loads every shard
    logits = runner.run(step)                     # ModelRunner's contract, on rank 0
    runner.close()

The other ranks are `python -m lmdeploy.turbomind.tp_worker` processes, each holding one end
of a socket pair: plans go down it (a worker waits on it while the engine idles, with no
timeout to hit) and a worker's error comes back up it. Rank r runs on cuda:(base + r) where
rank 0 is on cuda:base; on CPU every rank is a process on the same CPUs.

Failure: a rank that dies, or reports an error, makes the group unusable. A watchdog thread
sees it at once (its socket closes) and calls `on_failure` (the engine stops and fails every
request); a step in flight fails with `RankFailed` (its collective errors out when the peer's
sockets close); `close()` stops every rank that is left.
"""
import dataclasses
import logging
import os
import os.path as osp
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection, wait
from typing import Callable, List, Optional

import torch

from .config import ConfigError, EngineConfig
from .errors import EngineFailure
from .model_runner import ModelRunner
from .step_input import StepInput

logger = logging.getLogger('lmdeploy.turbomind')

STARTUP_TIMEOUT = 600.0  # seconds for a rank to load its shard and plan its memory
STOP_TIMEOUT = 10.0


class RankFailed(EngineFailure):
    """A tensor-parallel rank died or failed; the engine cannot go on."""


def check_tp(cfg: EngineConfig, tp) -> int:
    """`tp` as an int, or a ConfigError saying why it cannot split this model here."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f'tp must be a positive integer, got {tp!r}')
    for key in ('head_num', 'kv_head_num', 'inter_size', 'vocab_size'):
        if getattr(cfg, key) % tp:
            raise ConfigError(f'tp={tp} does not divide {key} {getattr(cfg, key)} (heads, KV '
                              'heads, the FFN width and the vocabulary are split evenly)')
    if tp > 1 and cfg.device.startswith('cuda'):
        base = rank_device(cfg.device, 0).index
        count = torch.cuda.device_count()
        if base + tp > count:
            raise ConfigError(f'tp={tp} needs {tp} GPUs from cuda:{base} on; {count} visible')
    return tp


def rank_device(device: str, rank: int) -> torch.device:
    """Rank `rank`'s device when rank 0 uses `device`."""
    device = torch.device(device)
    if device.type != 'cuda':
        return device
    base = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device('cuda', base + rank)


def python_executable() -> str:
    """The interpreter for the worker processes. Inside an embedding host (Triton's Python
    backend stub) sys.executable is the host binary, not Python."""
    exe = sys.executable
    if exe and osp.basename(exe).startswith('python'):
        return exe
    for name in (f'python{sys.version_info.major}.{sys.version_info.minor}', 'python3'):
        candidate = osp.join(sys.exec_prefix, 'bin', name)
        if osp.isfile(candidate):
            return candidate
    raise RuntimeError(f'cannot find a Python interpreter for the tensor-parallel ranks '
                       f'(sys.executable={exe!r})')


def step_message(step: StepInput) -> dict:
    """A StepInput as plain numpy arrays and ints (what crosses the socket)."""
    out = {}
    for f in dataclasses.fields(StepInput):
        value = getattr(step, f.name)
        out[f.name] = value.cpu().numpy() if isinstance(value, torch.Tensor) else value
    return out


def step_from_message(msg: dict) -> StepInput:
    return StepInput(**{k: torch.from_numpy(v) if hasattr(v, 'dtype') else v
                        for k, v in msg.items()})


class _Worker:
    """Rank r's process and our end of its socket."""

    def __init__(self, rank: int, init: dict):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env['LMDEPLOY_TP_RANK'] = str(rank)
        # the modules rank 0 imported, wherever they came from (a source tree, a host's paths)
        env['PYTHONPATH'] = os.pathsep.join(p for p in sys.path if p)
        self.rank = rank
        self.proc = subprocess.Popen(
            [python_executable(), '-m', 'lmdeploy.turbomind.tp_worker', str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send(init)

    def describe_exit(self, wait_s: float = 2.0) -> str:
        """Why the rank is gone: its last message, else its exit status."""
        message = None
        try:
            while self.conn.poll():
                kind, text = self.conn.recv()
                if kind == 'error':
                    message = text
        except (EOFError, OSError):
            pass
        try:
            code = self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            code = None
        if message:
            return f'rank {self.rank} failed: {message}'
        if code is None:
            return f'rank {self.rank} stopped answering'
        how = f'signal {-code}' if code < 0 else f'exit code {code}'
        return f'rank {self.rank} died ({how})'


class TensorParallelRunner:
    """Rank 0's runner plus the other ranks' processes, behind ModelRunner's interface
    (`run`, and rank 0's `cfg`, `num_blocks`, `memory`, ...) plus `close`."""

    def __init__(self, cfg: EngineConfig, tp: int, weights_init: Optional[Callable] = None,
                 kernels: Optional[str] = None, cuda_graph: Optional[bool] = None):
        from torch import distributed as dist

        from .distributed import STORE_TIMEOUT, ProcessGroupComm
        self.tp = check_tp(cfg, tp)
        self.on_failure: Optional[Callable[[Exception], None]] = None
        self.failure: Optional[RankFailed] = None
        self._closing = False
        self._lock = threading.Lock()
        store = dist.TCPStore('127.0.0.1', 0, tp, True, timeout=STORE_TIMEOUT,
                              wait_for_workers=False)
        threads = max(1, (os.cpu_count() or 1) // tp)
        self.workers: List[_Worker] = []
        try:
            for rank in range(1, tp):
                init = dict(rank=rank, tp=tp, port=store.port, threads=threads,
                            cfg=dataclasses.replace(cfg, device=str(rank_device(cfg.device, rank))),
                            weights_init=weights_init, kernels=kernels, cuda_graph=cuda_graph)
                self.workers.append(_Worker(rank, init))
            self._await('joining')
            comm = ProcessGroupComm.connect(0, tp, store.port, rank_device(cfg.device, 0),
                                            store=store)
            try:
                self.runner = ModelRunner(cfg, rank=0, tp=tp, comm=comm, kernels=kernels,
                                          weights_init=weights_init, cuda_graph=cuda_graph)
            except Exception as e:  # noqa: BLE001 - a worker's failure explains ours best
                dead = self._first_dead()
                if dead is not None:
                    raise RankFailed(dead.describe_exit()) from None
                raise e
            self._await('ready')
        except BaseException:
            self._stop_workers(timeout=1.0)
            raise
        self._store = store
        self._watchdog = threading.Thread(target=self._watch, name='turbomind-tp-watchdog',
                                          daemon=True)
        self._watchdog.start()

    def __getattr__(self, name):
        # everything else (cfg, num_blocks, kv_cache, memory, device, graphs, ...) is rank 0's
        if name == 'runner':
            raise AttributeError(name)
        return getattr(self.runner, name)

    # ----------------------------------------------------------------------------------------

    def run(self, step: StepInput, timer=None) -> torch.Tensor:
        if self.failure is not None:
            raise self.failure
        msg = step_message(step)
        try:
            for w in self.workers:
                w.conn.send(msg)
            return self.runner.run(step, timer)
        except Exception as e:  # noqa: BLE001 - the ranks may now be out of step: fatal
            if self.failure is not None:  # the watchdog saw a rank go (and closed its socket)
                raise self.failure from None
            dead = self._first_dead(wait_s=2.0)
            reason = dead.describe_exit() if dead is not None else f'rank 0 failed: {e}'
            raise self._fail(reason) from None

    def close(self):
        with self._lock:
            self._closing = True
        self._stop_workers(timeout=STOP_TIMEOUT)

    # ----------------------------------------------------------------------------------------

    def _await(self, expected: str):
        """Wait until every worker has sent `expected`; a worker that fails or dies first
        raises RankFailed with its reason."""
        pending = {w.conn: w for w in self.workers}
        while pending:
            ready = wait(list(pending), timeout=STARTUP_TIMEOUT)
            if not ready:
                raise RankFailed(f'ranks {sorted(w.rank for w in pending.values())} did not '
                                 f'start within {STARTUP_TIMEOUT:.0f} s')
            for conn in ready:
                worker = pending[conn]
                try:
                    kind, text = conn.recv()
                except (EOFError, OSError):
                    raise RankFailed(worker.describe_exit()) from None
                if kind == 'error':
                    worker.proc.wait()
                    raise RankFailed(f'rank {worker.rank} failed: {text}')
                if kind == expected:
                    del pending[conn]

    def _first_dead(self, wait_s: float = 0.0) -> Optional[_Worker]:
        try:
            ready = wait([w.conn for w in self.workers], timeout=wait_s)
        except (OSError, ValueError):  # a socket closed by the watchdog: its rank is gone
            ready = [w.conn for w in self.workers if w.conn.closed]
        for w in self.workers:
            if w.conn in ready or w.proc.poll() is not None:
                return w
        return None

    def _watch(self):
        conns = [w.conn for w in self.workers]
        try:
            ready = wait(conns)
        except (OSError, ValueError):  # closed under us by close()
            return
        with self._lock:
            if self._closing:
                return
        worker = next(w for w in self.workers if w.conn in ready)
        error = self._fail(worker.describe_exit())
        logger.error('tensor parallel: %s; stopping the engine', error)
        if self.on_failure is not None:
            self.on_failure(error)
        self._stop_workers(timeout=1.0)

    def _fail(self, reason: str) -> RankFailed:
        with self._lock:
            if self.failure is None:
                self.failure = RankFailed(f'tensor parallel: {reason}; the engine has stopped')
            return self.failure

    def _stop_workers(self, timeout: float):
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
        for w in self.workers:
            try:
                w.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            try:
                w.conn.close()
            except OSError:
                pass
