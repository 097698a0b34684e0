"""The `turbomind` model of the Triton service: a decoupled Triton python-backend model that
runs the TurboMind engine and speaks LMDeploy v0.0.2's tensor interface (behaviour reference
9.1).

`python -m lmdeploy.serve.turbomind.triton_server` serves it: the launcher writes a model
repository whose `turbomind/1/model.py` imports `TritonPythonModel` from here, with the
workspace's own `interactive/config.pbtxt` (same tensors, `reshape`s and parameters, so the
`model_name` parameter stays readable by clients) switched to `backend: "python"` and one
instance. That one instance holds one engine: every request runs on its own thread and all of
them share the engine's persistent batch, sessions keyed by `CORRID`.

Per request (one row; `max_batch_size: 1`):

* inputs `input_ids`/`input_lengths`, `request_output_len`, `step`, `runtime_top_k`,
  `runtime_top_p`, `temperature`, `repetition_penalty`, `random_seed`, `stop_words_list`,
  `bad_words_list` (v0.0.2's `[2, N]` ids/offsets format, single-token words), `START`, `END`,
  `STOP`, `CORRID` (the Triton request's correlation id when the tensor is absent);
* one response per engine step and a final one (`TRITONSERVER_RESPONSE_COMPLETE_FINAL`), each
  with `output_ids` UINT32 `[1, 1, sequence_length]`: the session's tokens (the history kept by
  `step`, this turn's input, the tokens generated so far, a final EOS / stop word included) and
  `sequence_length` UINT32 `[1, 1]`; v0.0.2 padded `output_ids` to session_len, clients slice by
  `sequence_length` either way;
* `STOP=1` cancels the session's running request (`END=1` too: ends the session); `END=1` with
  no input or `request_output_len=0` ends the session without generating;
* a request the engine refuses (unknown session, busy, too long, bad values) gets one error
  response saying why (`TurboMind refused the request (InvalidRequest, code 1): ...`); the
  engine and every other request go on;
* a client that goes away (cancelled gRPC stream, closed connection) is noticed at the next
  engine step: its request is cancelled, which frees its batch slot (the session's KV stays, as
  for `STOP`).

Defaults where v0.0.2's backend had them: no `runtime_top_k`/`runtime_top_p` = greedy,
`temperature`/`repetition_penalty` 1.0, no `stop_words_list` = stop at EOS only, no `step` =
keep the whole history.

Request parsing (`parse_request`, `parse_words`) is plain numpy, testable without Triton.
"""
from __future__ import annotations

import json
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


class BadRequest(ValueError):
    """A request whose tensors make no sense (reported to the client, nothing runs)."""


def _scalar(inputs: Dict[str, np.ndarray], name: str, cast=int, default=None):
    value = inputs.get(name)
    if value is None:
        return default
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise BadRequest(f'{name} must hold one value, got shape {list(np.shape(value))}')
    return cast(flat[0].item())


def parse_words(value: Optional[np.ndarray], name: str) -> Optional[List[int]]:
    """v0.0.2's words list ([1, 2, N] or [2, N]: row 0 the ids of all words concatenated, row 1
    each word's end offset, both padded with -1) -> the ids of its words (one token each)."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise BadRequest(f'{name} must be [1, 2, N], got shape {list(arr.shape)}')
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise BadRequest(f'{name} must be [2, N] (ids, offsets), got shape {list(arr.shape)}')
    ids = [int(x) for x in arr[0]]
    offsets = [int(x) for x in arr[1] if x >= 0]
    words, start = [], 0
    for end in offsets:
        if end <= start or end > len(ids):
            raise BadRequest(f'{name}: offsets {offsets} do not fit {len(ids)} ids')
        word = ids[start:end]
        if len(word) != 1:
            raise BadRequest(f'{name}: only single-token words are supported, got {word}')
        words.append(word[0])
        start = end
    return words


@dataclass
class TurnRequest:
    """One parsed request of the turbomind model."""
    session_id: int
    input_ids: List[int]
    request_output_len: int
    start: bool = False
    end: bool = False
    stop: bool = False
    step: int = -1
    top_k: int = 1
    top_p: float = 0.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    random_seed: Optional[int] = None
    stop_words: List[int] = field(default_factory=list)
    bad_words: Optional[List[int]] = None


def parse_request(inputs: Dict[str, np.ndarray], correlation_id: int = 0) -> TurnRequest:
    """The engine call described by one request's tensors (by name; batch dim of 1 or none)."""
    ids = inputs.get('input_ids')
    if ids is None:
        raise BadRequest('input_ids is required')
    ids = np.asarray(ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise BadRequest(f'one request carries one sequence, got input_ids of shape {list(ids.shape)}')
        ids = ids[0]
    if ids.ndim != 1:
        raise BadRequest(f'input_ids must be [1, L], got shape {list(ids.shape)}')
    length = _scalar(inputs, 'input_lengths', default=ids.shape[0])
    if not 0 <= length <= ids.shape[0]:
        raise BadRequest(f'input_lengths = {length} does not fit input_ids of length {ids.shape[0]}')
    out_len = np.asarray(inputs.get('request_output_len', np.zeros(1))).reshape(-1)
    if out_len.size < 1:
        raise BadRequest('request_output_len is empty')
    top_k = _scalar(inputs, 'runtime_top_k')
    top_p = _scalar(inputs, 'runtime_top_p', float)
    if top_k is None:
        top_k = 1 if not top_p else 0  # v0.0.2's backend: neither given = greedy
    corrid = _scalar(inputs, 'CORRID', default=correlation_id)
    stop_words = parse_words(inputs.get('stop_words_list'), 'stop_words_list')
    return TurnRequest(
        session_id=int(corrid), input_ids=[int(t) for t in ids[:length]],
        request_output_len=int(out_len[0]),
        start=bool(_scalar(inputs, 'START', default=0)), end=bool(_scalar(inputs, 'END', default=0)),
        stop=bool(_scalar(inputs, 'STOP', default=0)), step=_scalar(inputs, 'step', default=-1),
        top_k=int(top_k), top_p=1.0 if not top_p else float(top_p),
        temperature=_scalar(inputs, 'temperature', float, 1.0),
        repetition_penalty=_scalar(inputs, 'repetition_penalty', float, 1.0),
        random_seed=_scalar(inputs, 'random_seed'),
        stop_words=stop_words or [],
        bad_words=parse_words(inputs.get('bad_words_list'), 'bad_words_list'))


def _describe(e: BaseException) -> str:
    code = getattr(e, 'code', None)
    text = ' '.join(str(e).split()) or type(e).__name__
    if code is not None:
        return f'TurboMind refused the request ({type(e).__name__}, code {code}): {text}'
    return f'TurboMind execute failure ({type(e).__name__}): {text}'


class TurbomindServer:
    """The engine side of the `turbomind` model, independent of Triton: `run(turn, send,
    cancelled)` serves one request on the calling thread, calling `send(output_ids,
    sequence_length, final)` per step and `cancelled()` to learn whether the client left."""

    def __init__(self, workspace: str, tp: int = 1, **config_overrides):
        from lmdeploy.turbomind import TurboMind
        self.tm = TurboMind(workspace, tp=tp, **config_overrides)
        # Each session's tokens as the engine holds them (history, inputs, outputs), so that a
        # response can carry the whole sequence as v0.0.2's did.
        self._tokens: Dict[int, List[int]] = {}
        self._lock = threading.Lock()

    def close(self):
        self.tm.close()

    def _history(self, turn: TurnRequest) -> List[int]:
        with self._lock:
            stored = [] if turn.start else self._tokens.get(turn.session_id, [])
        if 0 <= turn.step <= len(stored):
            return stored[:turn.step]
        return list(stored)

    def _store(self, session_id: int, tokens: Optional[List[int]]):
        with self._lock:
            if tokens is None:
                self._tokens.pop(session_id, None)
            else:
                self._tokens[session_id] = tokens

    def run(self, turn: TurnRequest, send, cancelled=lambda: False) -> None:
        instance = self.tm.create_instance()
        if turn.stop:
            if turn.start:
                from lmdeploy.turbomind.errors import InvalidRequest
                raise InvalidRequest('START and STOP in one request')
            if turn.end:
                instance.end(turn.session_id)
                self._store(turn.session_id, None)
            else:
                instance.cancel(turn.session_id)
            send([], 0, True)
            return
        if turn.end and not turn.start and (not turn.input_ids or turn.request_output_len == 0):
            history = self._history(turn)
            instance.end(turn.session_id)  # nothing to generate: just free the session
            self._store(turn.session_id, None)
            send(history, len(history), True)
            return
        history = self._history(turn)
        prefix = history + turn.input_ids
        outputs: List[int] = []
        gen = instance.stream_infer(
            turn.session_id, turn.input_ids, request_output_len=turn.request_output_len,
            sequence_start=turn.start, sequence_end=turn.end, step=turn.step,
            top_p=turn.top_p, top_k=turn.top_k, temperature=turn.temperature,
            repetition_penalty=turn.repetition_penalty, random_seed=turn.random_seed,
            stream_output=True, bad_words=turn.bad_words, stop_words=turn.stop_words)
        try:
            for out in gen:
                outputs = out[0][0].tolist()
                if cancelled():
                    break
                seq = prefix + outputs
                send(seq, len(seq), False)
        finally:
            gen.close()  # a client that left: the engine cancels the request
        tokens = prefix + outputs
        self._store(turn.session_id, None if turn.end else tokens)
        if not cancelled():
            send(tokens, len(tokens), True)


class TritonPythonModel:
    """The Triton python-backend entry point (decoupled)."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils
        self.pb = pb_utils
        config = json.loads(args['model_config'])
        if not config.get('model_transaction_policy', {}).get('decoupled'):
            raise pb_utils.TritonModelException('the turbomind model must be decoupled')
        params = {k: v.get('string_value') for k, v in (config.get('parameters') or {}).items()}
        workspace = params.get('workspace')
        if not workspace:
            raise pb_utils.TritonModelException('parameter "workspace" is missing')
        overrides = json.loads(params.get('engine_config') or '{}')
        tp = int(params.get('tensor_para_size') or 1)
        tp = int(params.get('tp') or tp)
        self.server = TurbomindServer(workspace, tp=tp, **overrides)
        self.output_dtypes = {o['name']: pb_utils.triton_string_to_numpy(o['data_type'])
                              for o in config['output']}
        self.threads: List[threading.Thread] = []
        self.threads_lock = threading.Lock()
        tm = self.server.tm
        print(f'[lmdeploy] turbomind model ready: {tm.model_name}, session_len {tm.session_len}, '
              f'max_batch_size {tm.config.max_batch_size}', file=sys.stderr, flush=True)

    def execute(self, requests):
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True,
                                      name='turbomind-request')
            with self.threads_lock:
                self.threads = [t for t in self.threads if t.is_alive()]
                self.threads.append(thread)
            thread.start()
        return None

    def _response(self, tokens, length):
        pb = self.pb
        ids = np.asarray(tokens, dtype=np.uint32).reshape(1, 1, -1)
        seq = np.asarray([[length]], dtype=np.uint32)
        return pb.InferenceResponse(output_tensors=[pb.Tensor('output_ids', ids),
                                                    pb.Tensor('sequence_length', seq)])

    def _serve(self, request):
        pb = self.pb
        sender = request.get_response_sender()
        final_sent = False

        def send(tokens, length, final):
            nonlocal final_sent
            flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            sender.send(self._response(tokens, length), flags=flags)
            final_sent = final_sent or final

        def cancelled():
            try:
                return sender.is_cancelled()
            except Exception:  # noqa: BLE001 - an older backend: never cancelled
                return False

        try:
            inputs = {}
            for name in ('input_ids', 'input_lengths', 'request_output_len', 'step', 'runtime_top_k',
                         'runtime_top_p', 'temperature', 'repetition_penalty', 'random_seed',
                         'stop_words_list', 'bad_words_list', 'START', 'END', 'STOP', 'CORRID'):
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                corr = int(request.correlation_id())
            except Exception:  # noqa: BLE001 - string correlation ids
                corr = 0
            turn = parse_request(inputs, corr)
            self.server.run(turn, send, cancelled)
            if not final_sent and cancelled():
                sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # noqa: BLE001 - reported to this client only
            from lmdeploy.turbomind.errors import EngineError, RequestError
            if not isinstance(e, (RequestError, EngineError, BadRequest)):
                traceback.print_exc()
            message = str(e) if isinstance(e, BadRequest) else _describe(e)
            if isinstance(e, BadRequest):
                message = f'bad request: {message}'
            if not final_sent:
                try:
                    sender.send(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message)),
                                flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:  # noqa: BLE001 - the client is gone
                    pass

    def finalize(self):
        server = getattr(self, 'server', None)
        if server is not None:
            server.close()
        for thread in list(getattr(self, 'threads', [])):
            thread.join(timeout=5)
