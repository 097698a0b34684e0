"""Public API of the TurboMind engine (LMDeploy v0.0.2, section 6, with its bugs fixed).

    tm = TurboMind('./workspace')                     # one engine, one persistent batch
    instance = tm.create_instance()                   # one per caller thread
    for outputs in instance.stream_infer(session_id=1, input_ids=ids, stream_output=True):
        output_ids, n = outputs[0]                    # this turn's new tokens so far
        outputs[0].finish_reason                      # '' until done: stop/length/cancel/error
    logits = instance.decode([ids])                   # [B, max_len, vocab] fp32

Differences from v0.0.2 on purpose: bad requests raise typed errors (`errors.py`) instead of
yielding garbage; yielded ids are copies; `decode` never touches live sessions nor mutates its
input; `end` and `cancel` exist; unseeded requests get a fresh random stream.
"""
from __future__ import annotations

import gc
import numbers
import os.path as osp
import threading
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..model import get_template
from .config import EngineConfig
from .engine import PRIVATE_SESSION_BASE, Engine, Request, Wakeup
from .errors import EngineError, InvalidRequest, SessionInactive, error_for
from .model_runner import ModelRunner
from .tensor_parallel import TensorParallelRunner, check_tp
from .sampling import SamplingParams
from .tokenizer import Tokenizer


def _freeze_startup_heap():
    """Put everything alive after start-up (torch, the weights' wrappers, the CUDA graphs:
    ~250k objects) out of the cyclic garbage collector's reach. A full collection over them
    takes 50-100 ms with every Python thread stopped, the engine loop included: a per-token
    latency spike of that size whenever one happens while serving. (CUDA only: on the CPU,
    where engines come and go in tests, frozen objects would never be collected.)"""
    gc.collect()
    gc.freeze()


class TurboMind:
    """The engine over a workspace written by `lmdeploy.serve.turbomind.deploy`.

    Args:
        model_path: the workspace root (it holds triton_models/weights/config.ini).
        tp: tensor-parallel degree: one process per rank (rank 0 is this one), each on its
            own GPU (cuda:0..tp-1 from the configured device on) or all on the CPU. A workspace
            deployed with another tp is re-sliced at load (v0.0.3's runtime split).
        eos_id: end-of-sequence id (default: config.ini's end_id).
        data_type: v0.0.2's name for the dtype ('fp16'/'half', 'bf16', 'fp32').
        dummy: instead of a workspace, a named shape from `dummy.SHAPES` ('llama2-7b',
            'llama3-8b', 'llama2-13b', 'tiny') with random weights made on the device (no
            tokenizer); model_path is then ignored (pass None).
        config_defaults: EngineConfig keys for what the workspace's config.ini (or the dummy
            shape) does not set, e.g. api_server's max_mixed_prefill_tokens.
        **config_overrides: any EngineConfig key (max_batch_size, session_len, block_size,
            num_blocks, cache_max_entry_count, max_prefill_tokens, dtype, device, cuda_graph,
            ...).
    """

    def __init__(self, model_path: Optional[str] = None, tp: int = 1,
                 eos_id: Optional[int] = None, data_type: Optional[str] = None,
                 dummy: Optional[str] = None, config_defaults: Optional[dict] = None,
                 **config_overrides):
        if data_type is not None:
            config_overrides.setdefault('dtype', {'half': 'fp16'}.get(data_type, data_type))
        weights_init = None
        if dummy is not None:
            from .dummy import dummy_config, dummy_weights
            self.config = cfg = dummy_config(dummy, config_defaults, **config_overrides)
            weights_init = dummy_weights
            model_path = model_path or f'dummy:{dummy}'
        elif model_path is None:
            raise ValueError('TurboMind needs a workspace path (or dummy=<shape>)')
        else:
            self.config = cfg = EngineConfig.from_workspace(model_path, config_defaults,
                                                            **config_overrides)
        self.model_path = model_path
        self.model_name = cfg.model_name
        self.session_len = cfg.session_len
        self.gpu_count = tp  # v0.0.2's name
        self.eos_id = cfg.end_id if eos_id is None else int(eos_id)
        self.template = get_template(cfg.model_name)
        tokenizer_dir = osp.join(model_path, 'triton_models', 'tokenizer')
        self.tokenizer = Tokenizer(tokenizer_dir) if dummy is None and osp.isdir(
            tokenizer_dir) else None
        stop_words = (self.template.stop_words_for(self.tokenizer) if self.tokenizer
                      else self.template.stop_words) or []
        self.stop_words = [w for w in stop_words if 0 <= w < cfg.vocab_size]
        tp = check_tp(cfg, tp)
        if tp == 1:
            self.runner = ModelRunner(cfg, rank=0, tp=1, weights_init=weights_init)
        else:
            self.runner = TensorParallelRunner(cfg, tp, weights_init=weights_init)
        try:
            self.engine = Engine(self.runner)
        except BaseException:
            self._close_runner()
            raise
        if tp > 1:
            self.runner.on_failure = self.engine.abort
        if str(cfg.device).startswith('cuda'):
            _freeze_startup_heap()

    def create_instance(self, cuda_stream_id: int = 0) -> 'TurboMindInstance':
        return TurboMindInstance(self)

    def close(self):
        """Stop the engine thread (requests still running fail with EngineError) and the
        other tensor-parallel ranks."""
        self.engine.close()
        self._close_runner()

    def _close_runner(self):
        close = getattr(self.runner, 'close', None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _as_id_rows(input_ids) -> Tuple[List[List[int]], bool]:
    """(rows, batched): accepts a list of ids or a list of lists (tensors/arrays too)."""
    if isinstance(input_ids, torch.Tensor):
        input_ids = input_ids.tolist()
    elif hasattr(input_ids, 'tolist'):
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)):
        raise InvalidRequest(f'input_ids must be a list of token ids, got {type(input_ids).__name__}')
    batched = bool(input_ids) and not _is_int(input_ids[0])
    rows = [list(r.tolist() if hasattr(r, 'tolist') else r) for r in input_ids] if batched \
        else [list(input_ids)]
    for row in rows:
        for token in row:
            if not _is_int(token):
                raise InvalidRequest(f'token ids must be integers, got {token!r}')
    return rows, batched


_I64_MAX = (1 << 63) - 1


def _session_id(sid) -> int:
    """A caller's session id (v0.0.2's CORRID). The upper half of the uint64 range is kept for
    the engine's private sessions (`decode`), so a caller can never collide with them."""
    if not _is_int(sid) or not 0 <= sid < PRIVATE_SESSION_BASE:
        raise InvalidRequest(f'session_id must be an integer in [0, 2**63), got {sid!r}')
    return int(sid)


def _check_vocab(rows: List[List[int]], vocab_size: int):
    for row in rows:
        for i, token in enumerate(row):
            if not 0 <= token < vocab_size:
                raise InvalidRequest(f'input_ids[{i}] = {token} is outside the vocabulary '
                                     f'[0, {vocab_size})')


def _per_row(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidRequest(f'{name} has {len(value)} entries for {n} rows')
        return list(value)
    return [value] * n


class StreamOutput(tuple):
    """One row of what `stream_infer` yields: v0.0.2's pair ``(output_ids, n)`` (it unpacks and
    compares as before), plus

    * `finish_reason`: '' while the row generates, then 'stop' (EOS or a stop word), 'length'
      (request_output_len or session_len reached), 'cancel' (cancelled, ended or abandoned) or
      'error' -- the engine's own reason;
    * `stamps` (once finished): ``(time.perf_counter(), n)`` for each engine step that handed
      tokens over, so per-token latencies are known without waking up for every token.
    """

    def __new__(cls, output_ids: torch.Tensor, n: int, finish_reason: str = '',
                stamps: Sequence[tuple] = ()):
        self = super().__new__(cls, (output_ids, n))
        self.finish_reason = finish_reason
        self.stamps = stamps
        return self


class _TokenBuffer:
    """A row's tokens, copied in as they come: a wake-up converts only the new ids.

    numpy, not torch, on purpose: every torch call releases and retakes the GIL, and with
    hundreds of streaming threads each retake is a wait (the engine loop's included)."""

    def __init__(self):
        self.buf = np.empty(64, dtype=np.int32)
        self.n = 0

    def take(self, ids: List[int], n: int) -> torch.Tensor:
        """A copy of ``ids[:n]`` as an int32 tensor (`ids` only ever grows)."""
        if n > self.n:
            if n > len(self.buf):
                grown = np.empty(max(n, 2 * len(self.buf)), dtype=np.int32)
                grown[:self.n] = self.buf[:self.n]
                self.buf = grown
            self.buf[self.n:n] = ids[self.n:n]
            self.n = n
        return torch.from_numpy(self.buf[:n].copy())


class TurboMindInstance:
    """A caller's handle on the shared engine; use one per thread."""

    def __init__(self, tm: TurboMind):
        self.tm = tm
        self.engine: Engine = tm.engine

    def stream_infer(self, session_id, input_ids, request_output_len: int = 512,
                     sequence_start: bool = True, sequence_end: bool = False, step=1,
                     stop: bool = False, top_p=0.8, top_k=40, temperature=0.8,
                     repetition_penalty=1.0, ignore_eos: bool = False,
                     random_seed: Optional[int] = None, stream_output: bool = False,
                     bad_words: Optional[Sequence[int]] = None,
                     stop_words: Optional[Sequence[int]] = None
                     ) -> Iterator[List[StreamOutput]]:
        """Generate for one session (or a batch of sessions: lists of ids and session ids).

        Yields a list with one `(output_ids, n_tokens)` per row: the tokens generated by this
        call so far (an int32 tensor, a copy) and their count; the final stop token (EOS or a
        stop word) is included, as in v0.0.2. Each pair is a `StreamOutput`, which also carries
        the row's `finish_reason` and token `stamps`. With `stream_output` it yields after every engine
        step, otherwise once at the end. `step` is the history length to keep (v0.0.2: pass the
        session's token count; a smaller value rewinds). `stop=True` cancels the session's
        running request instead (see `cancel`). `bad_words` bans ids; `stop_words` replaces the
        template's stop words. Bad requests raise a `RequestError` subclass.
        """
        rows, batched = _as_id_rows(input_ids)
        _check_vocab(rows, self.tm.config.vocab_size)
        n = len(rows)
        sessions = [_session_id(sid) for sid in _per_row(session_id, n, 'session_id')]
        if stop:
            for sid in sessions:
                self.cancel(sid) if not sequence_end else self.end(sid)
            yield [StreamOutput(torch.zeros(0, dtype=torch.int32), 0) for _ in range(n)]
            return
        requests = self._submit(rows, sessions, request_output_len, sequence_start,
                                sequence_end, _per_row(step, n, 'step'), top_p, top_k,
                                temperature, repetition_penalty, ignore_eos,
                                _per_row(random_seed, n, 'random_seed'), bad_words, stop_words,
                                cond=Wakeup(), stream=bool(stream_output))
        try:
            yield from self._stream(requests, stream_output)
        finally:
            self.cancel_unfinished(requests)

    def submit(self, session_id, input_ids, request_output_len: int = 512,
               sequence_start: bool = True, sequence_end: bool = False, step=1, top_p=0.8,
               top_k=40, temperature=0.8, repetition_penalty=1.0, ignore_eos: bool = False,
               random_seed: Optional[int] = None, bad_words: Optional[Sequence[int]] = None,
               stop_words: Optional[Sequence[int]] = None, cond=None) -> List[Request]:
        """`stream_infer` without the waiting: start the rows and return their `Request`s.

        The engine fills each request (`output_ids`, `finished`, `reason`, `error`, `stamps`)
        and, after a step that changed any of them, runs ``with cond: cond.notify_all()``
        (`cond`: a new `threading.Condition` by default; an asyncio server passes an object of
        that shape that wakes its event loop). Read `finished` before `output_ids`: once it is
        True every token is there. Bad arguments raise a `RequestError` here, problems the
        engine finds arrive in `error`. Call `cancel_unfinished` for rows you stop reading.
        """
        rows, _ = _as_id_rows(input_ids)
        _check_vocab(rows, self.tm.config.vocab_size)
        n = len(rows)
        sessions = [_session_id(sid) for sid in _per_row(session_id, n, 'session_id')]
        return self._submit(rows, sessions, request_output_len, sequence_start, sequence_end,
                            _per_row(step, n, 'step'), top_p, top_k, temperature,
                            repetition_penalty, ignore_eos,
                            _per_row(random_seed, n, 'random_seed'), bad_words, stop_words,
                            cond=cond)

    def decode(self, input_ids) -> torch.Tensor:
        """Logits at every input position (v0.0.2 section 6.4): fp32 [B, max_len, vocab].

        Position i predicts token i+1; rows shorter than max_len are zero-padded. Each row runs
        as a private one-shot session, so live sessions are never touched.
        """
        rows, _ = _as_id_rows(input_ids)
        _check_vocab(rows, self.tm.config.vocab_size)
        wakeup = Wakeup()
        requests = []
        for row in rows:
            request = Request(self.engine.private_session_id(), SamplingParams(top_k=1), wakeup,
                              want_logits=True, stream=False)
            self.engine.submit(request, input_ids=row, request_output_len=0,
                               sequence_start=True, sequence_end=True, logits_all=True)
            requests.append(request)
        for _ in self._stream(requests, stream_output=False):
            pass
        vocab = self.tm.config.vocab_size
        out = torch.zeros(len(rows), max(len(r) for r in rows), vocab, dtype=torch.float32)
        for b, request in enumerate(requests):
            out[b, :len(request.logits)] = torch.stack(request.logits)
        return out

    def end(self, session_id: int) -> None:
        """End a session: stop what it runs and free its KV cache and history."""
        self.engine.cancel(_session_id(session_id), end=True)

    def cancel(self, session_id: int) -> None:
        """Stop the session's running request; it finishes with what it has, the cache is kept.

        Raises SessionInactive when nothing runs for the session.
        """
        code = self.engine.cancel(_session_id(session_id), end=False)
        if code:
            error = error_for(code, f'session {session_id} is not generating; nothing to cancel')
            raise error if not isinstance(error, EngineError) else SessionInactive(str(error))

    # ----------------------------------------------------------------------------------------

    def _submit(self, rows, sessions, request_output_len, sequence_start, sequence_end, steps,
                top_p, top_k, temperature, repetition_penalty, ignore_eos, seeds, bad_words,
                stop_words, cond=None, stream: bool = True) -> List[Request]:
        if not _is_int(request_output_len) or request_output_len < 0:
            raise InvalidRequest(f'request_output_len must be an integer >= 0, got {request_output_len!r}')
        tm = self.tm
        banned = list(bad_words or [])
        if ignore_eos:
            banned.append(tm.eos_id)  # v0.0.2: ignore_eos bans EOS and sends no stop words
        stops = [] if ignore_eos else list(tm.stop_words if stop_words is None else stop_words)
        n = len(rows)
        params = []
        for i, (k, p, t, r) in enumerate(zip(_per_row(top_k, n, 'top_k'), _per_row(top_p, n, 'top_p'),
                                            _per_row(temperature, n, 'temperature'),
                                            _per_row(repetition_penalty, n, 'repetition_penalty'))):
            try:
                params.append(SamplingParams(top_k=k, top_p=p, temperature=t, repetition_penalty=r,
                                             bad_words=banned, random_seed=seeds[i]
                                             ).validate(tm.config.vocab_size))
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
        cond = threading.Condition() if cond is None else cond
        requests = []
        for i, row in enumerate(rows):
            step = steps[i]
            if not _is_int(step):
                raise InvalidRequest(f'step must be an integer, got {step!r}')
            step = max(-1, min(int(step), _I64_MAX))  # beyond the history (or < 0): ignored
            request = Request(int(sessions[i]), params[i], cond, random_seed=seeds[i],
                              stream=stream)
            self.engine.submit(request, input_ids=row,
                               request_output_len=min(request_output_len, tm.session_len),
                               sequence_start=bool(sequence_start), sequence_end=bool(sequence_end),
                               step=step, end_id=-1 if ignore_eos else tm.eos_id,
                               stop_words=stops, ignore_eos=bool(ignore_eos),
                               random_seed=seeds[i])
            requests.append(request)
        return requests

    def _stream(self, requests: List[Request], stream_output: bool):
        """Yield snapshots of `requests` (which share one `Wakeup`) until all are finished.

        Streaming yields one snapshot per engine step that handed tokens over, also when this
        thread woke up late and several steps' tokens are already in (each step's state is
        known from the request's `stamps`)."""
        wakeup: Wakeup = requests[0].cond
        buffers = [_TokenBuffer() for _ in requests]
        shown = [0] * len(requests)  # tokens of each row in the last snapshot
        stamped = [0] * len(requests)  # stamps of each row already turned into snapshots
        while True:
            wakeup.wait()
            # `finished` first: the engine sets it after the last tokens are in.
            done = [r.finished for r in requests]
            failed = next((r.error for r in requests if r.error is not None), None)
            if failed is not None:
                raise failed
            finished = all(done)
            state = [len(r.output_ids) for r in requests]
            steps = [[shown[j]] for j in range(len(requests))]
            if stream_output:  # the length of each row after each step since the last snapshot
                for j, r in enumerate(requests):
                    new = r.stamps[stamped[j]:]
                    stamped[j] += len(new)
                    steps[j] += [n for _, n in new if shown[j] < n < state[j]]
            for j in range(len(requests)):
                steps[j].append(state[j])
            for k in range(1, max(len(s) for s in steps)):
                lens = [s[min(k, len(s) - 1)] for s in steps]
                last = k == max(len(s) for s in steps) - 1
                if lens == shown and not (finished and last):
                    continue  # a wake-up may bring nothing
                if not (stream_output or (finished and last)):
                    continue
                shown = lens
                yield [StreamOutput(buf.take(r.output_ids, n), n,
                                    r.reason if fin and n == full else '',
                                    r.stamps if fin and n == full else ())
                       for r, buf, fin, n, full in zip(requests, buffers, done, lens, state)]
            if finished:
                return

    def cancel_unfinished(self, requests: List[Request]):
        """Cancel the rows of a `submit` that still run (a caller that stops reading)."""
        for request in requests:
            if not request.finished and request.handle:
                try:
                    self.engine.cancel(request.session_id)
                except EngineError:
                    pass
