"""`Chatbot`: the gRPC client of the Triton service (behaviour reference 9.3).

    bot = Chatbot('127.0.0.1:33337')                  # model name, BOS/EOS, template: from the server
    for status, text, n in bot.stream_infer(1, 'What is 12 + 5?'):
        ...                                           # TRITON_STREAM_ING ..., then TRITON_STREAM_END
    bot.end(1)

One Chatbot holds one session. The first `stream_infer` starts it (`sequence_start`), later
ones continue it: only the new turn's text is sent, with `step` = the tokens the server holds
for the session. The reply streams through the tokenizer's incremental detokenizer, decoding on
the server's `postprocessing` model: a character made of several tokens shows once it is whole,
and the stop token's text is not shown.

Differences from v0.0.2 on purpose:
* the length check counts history + input: a turn that leaves no room for a reply yields
  `TRITON_SESSION_OUT_OF_LIMIT` ("... `end` the session ..."), nothing is sent; a smaller room
  than `request_output_len` shortens the reply instead of refusing the turn;
* stop words that are no fixed ids in the template (e.g. MiniChat's `<|end|>`) come from the
  server's `stop_words` model parameter;
* a generator closed early (a cancelled web request) cancels the server request;
* `StatusCode` is an IntEnum, so `status == 0` means `TRITON_STREAM_END`.
"""
from __future__ import annotations

import json
import logging
import queue
import random
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterator, List, Optional, Tuple

import numpy as np

from lmdeploy.model import MODELS
from lmdeploy.serve.turbomind.utils import Postprocessor, Preprocessor, get_logger, prepare_tensor

MODEL = 'turbomind'


class StatusCode(IntEnum):
    TRITON_STREAM_END = 0  # end of streaming
    TRITON_STREAM_ING = 1  # response is streaming
    TRITON_SESSION_READY = 2  # session is ready for inference
    TRITON_SERVER_ERR = -1  # triton server's error
    TRITON_SESSION_CLOSED = -2  # session has been closed
    TRITON_SESSION_OUT_OF_LIMIT = -3  # request length out of limit
    TRITON_SESSION_INVALID_ARG = -4  # invalid argument


@dataclass
class Session:
    session_id: int
    request_id: str = ''
    histories: str = ''  # the text of every prompt and response so far
    sequence_length: int = 0  # the tokens the server holds for the session
    prompt: str = ''
    response: str = ''
    status: Optional[StatusCode] = None


@dataclass
class GenerationConfig:
    session_len: int = 2048
    top_p: float = 0.8
    top_k: Optional[int] = None
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    stop_words: Optional[np.ndarray] = None
    bad_words: Optional[np.ndarray] = None


def words_list(ids: List[int]) -> np.ndarray:
    """v0.0.2's [1, 2, N] int32 words tensor for single-token words."""
    return np.array([[list(ids), list(range(1, len(ids) + 1))]], dtype=np.int32)


class Chatbot:
    """Chat with the `turbomind` model of a Triton server.

    Args:
        tritonserver_addr: `host:port` of the gRPC endpoint.
        model_name: chat template name; '' reads the server's `model_name` parameter.
        ignore_eos: send no stop words and ban EOS (replies run to the length limit).
        log_level: level of the `service.ft` logger.
        display: print the streamed reply on stdout.
        profile_generation / profile_serving: skip the chat template (benchmarks).
        **model_config: overrides of the template's session_len, top_p, top_k, temperature,
            repetition_penalty.
    """

    def __init__(self, tritonserver_addr: str, model_name: str = '', ignore_eos: bool = False,
                 log_level: int = logging.INFO, display: bool = False,
                 profile_generation: bool = False, profile_serving: bool = False, **model_config):
        import tritonclient.grpc as grpcclient
        self.tritonserver_addr = tritonserver_addr
        self.logger = get_logger(log_level=log_level)
        self.display = display
        self.profile_generation = profile_generation
        self.profile_serving = profile_serving
        self._client = grpcclient.InferenceServerClient(tritonserver_addr)
        params = self._model_parameters()  # raises when the server is unreachable
        self.model_name = model_name or params.get('model_name', '')
        if self.model_name not in MODELS:
            raise ValueError(f'the server\'s model {self.model_name!r} has no chat template '
                             f'here; known: {", ".join(MODELS.names())}')
        self.model = MODELS.get(self.model_name)()
        self.preprocess = Preprocessor(tritonserver_addr)
        self.postprocess = Postprocessor(tritonserver_addr)
        self.bos_id = self._get_bos()
        self.eos_id = self._get_eos()
        stop_ids = self.model.stop_words
        if stop_ids is None and params.get('stop_words'):
            stop_ids = json.loads(params['stop_words'])
        self.stop_ids = list(stop_ids or [])
        cfg = GenerationConfig(session_len=self.model.session_len, top_p=self.model.top_p,
                               top_k=self.model.top_k, temperature=self.model.temperature,
                               repetition_penalty=self.model.repetition_penalty)
        for key, value in model_config.items():
            if not hasattr(cfg, key):
                raise TypeError(f'unknown model config {key!r}')
            setattr(cfg, key, value)
        if ignore_eos:
            cfg.stop_words = None
            cfg.bad_words = words_list([self.eos_id])
        else:
            cfg.stop_words = words_list(self.stop_ids) if self.stop_ids else None
        self.cfg = cfg
        self._session: Optional[Session] = None

    # -- server facts ------------------------------------------------------------------------

    def _model_parameters(self) -> dict:
        config = self._client.get_model_config(MODEL).config
        return {k: v.string_value for k, v in config.parameters.items()}

    def _get_model_name(self) -> str:
        return self._model_parameters().get('model_name', '')

    def _get_bos(self) -> int:
        ids, lengths = self.preprocess('<BOS>')
        return int(ids[0][0]) if int(lengths[0][0]) else -1

    def _get_eos(self) -> int:
        ids, lengths = self.preprocess('<EOS>')
        return int(ids[0][int(lengths[0][0]) - 1]) if int(lengths[0][0]) else -1

    def _stop_words(self, stop_words: List[int]) -> Optional[np.ndarray]:
        return words_list(stop_words) if stop_words else None

    @property
    def session(self) -> Optional[Session]:
        return self._session

    @session.setter
    def session(self, value: Optional[Session]):
        self._session = value

    def reset_session(self):
        """Forget the local session (the server is not told; see `end`)."""
        self._session = None

    # -- chat --------------------------------------------------------------------------------

    def stream_infer(self, session_id: int, prompt: str, request_id: str = '',
                     request_output_len: Optional[int] = None, sequence_start: bool = False,
                     sequence_end: bool = False) -> Iterator[Tuple[StatusCode, str, int]]:
        """Send one turn; yield (status, reply text so far, tokens generated so far)."""
        if self._session is None:
            sequence_start = True
            self._session = Session(session_id=session_id)
        elif self._session.status == StatusCode.TRITON_SESSION_CLOSED:
            yield StatusCode.TRITON_SESSION_CLOSED, 'the session has been closed', 0
            return
        elif self._session.session_id != session_id:
            yield (StatusCode.TRITON_SESSION_INVALID_ARG,
                   f'this Chatbot holds session {self._session.session_id}, not {session_id}', 0)
            return
        session = self._session
        session.request_id = request_id
        session.status = StatusCode.TRITON_SESSION_READY
        if sequence_start:
            session.histories = ''
            session.sequence_length = 0
        if not (self.profile_generation or self.profile_serving):
            prompt = self.model.get_prompt(prompt, sequence_start)
        session.prompt = prompt
        session.response = ''
        self.logger.info(f'session {session_id}, request {request_id}: prompt {prompt!r}')
        yield from self._stream(session, prompt, request_output_len, sequence_start, sequence_end)

    def _inputs(self, session: Session, input_ids, input_len: int, request_output_len: int,
                sequence_start: bool, sequence_end: bool, stop: bool = False):
        cfg = self.cfg
        one = lambda v, dt: np.array([[v]], dtype=dt)  # noqa: E731
        inputs = [prepare_tensor('input_ids', np.asarray(input_ids, dtype=np.uint32).reshape(1, -1)),
                  prepare_tensor('input_lengths', one(input_len, np.uint32)),
                  prepare_tensor('request_output_len', one(request_output_len, np.uint32)),
                  prepare_tensor('runtime_top_p', one(cfg.top_p, np.float32)),
                  prepare_tensor('temperature', one(cfg.temperature, np.float32)),
                  prepare_tensor('repetition_penalty', one(cfg.repetition_penalty, np.float32)),
                  prepare_tensor('step', one(session.sequence_length, np.int32)),
                  prepare_tensor('session_len', one(cfg.session_len, np.uint32)),
                  prepare_tensor('START', one(int(sequence_start), np.int32)),
                  prepare_tensor('END', one(int(sequence_end), np.int32)),
                  prepare_tensor('STOP', one(int(stop), np.int32)),
                  prepare_tensor('CORRID', one(session.session_id, np.uint64))]
        if cfg.top_k is not None:
            inputs.append(prepare_tensor('runtime_top_k', one(cfg.top_k, np.uint32)))
        if cfg.stop_words is not None:
            inputs.append(prepare_tensor('stop_words_list', cfg.stop_words))
        if cfg.bad_words is not None:
            inputs.append(prepare_tensor('bad_words_list', cfg.bad_words))
        if sequence_start and not stop:
            inputs.append(prepare_tensor('random_seed', one(random.getrandbits(64), np.uint64)))
        return inputs

    def _stream(self, session: Session, prompt: str, request_output_len: Optional[int],
                sequence_start: bool, sequence_end: bool):
        input_ids, input_lengths = self.preprocess(prompt)
        input_len = int(input_lengths.reshape(-1)[0])
        input_ids = input_ids.reshape(-1)[:input_len]
        room = self.cfg.session_len - session.sequence_length - input_len
        if request_output_len is None:
            request_output_len = max(room, 0)
        if room < 1 or input_len + session.sequence_length >= self.cfg.session_len:
            message = (f'session {session.session_id}, out of max sequence length '
                       f'{self.cfg.session_len}: #input tokens {input_len}, history tokens '
                       f'{session.sequence_length}, request length {request_output_len}; '
                       f'`end` the session to start a new one')
            self.logger.warning(message)
            yield StatusCode.TRITON_SESSION_OUT_OF_LIMIT, message, 0
            return
        request_output_len = min(int(request_output_len), room)
        if len(input_ids) == 0:  # the server needs a tensor; input_lengths says it is empty
            input_ids = np.array([max(self.eos_id, 0)], dtype=np.uint32)
        inputs = self._inputs(session, input_ids, input_len, request_output_len, sequence_start,
                              sequence_end)
        offset = session.sequence_length + input_len
        detok = self._detokenizer()
        response, n_tokens, visible_done = '', 0, 0
        status = StatusCode.TRITON_SERVER_ERR
        for kind, payload in self._request(session, inputs):
            if kind == 'error':
                message = str(payload)
                self.logger.error(f'session {session.session_id}: {message}')
                session.sequence_length = offset - input_len
                session.status = StatusCode.TRITON_SERVER_ERR
                yield StatusCode.TRITON_SERVER_ERR, message, 0
                return
            output_ids, seq_len, final = payload
            if output_ids is None:
                continue
            if seq_len > offset and int(output_ids[seq_len - 1]) == self.eos_id:
                seq_len -= 1  # v0.0.2: EOS leaves the text and the history count
            new = output_ids[offset:seq_len]
            n_tokens = len(new)
            visible = n_tokens
            if visible and int(new[visible - 1]) in self.stop_ids:
                visible -= 1
            if visible > visible_done:
                delta = detok.step(new[visible_done:visible])
                visible_done = visible
                if delta:
                    response += delta
                    if self.display:
                        print(delta, end='', flush=True)
            session.sequence_length = max(seq_len, offset)
            if not final:
                yield StatusCode.TRITON_STREAM_ING, response, n_tokens
            status = StatusCode.TRITON_STREAM_END
        tail = detok.flush().replace('\ufffd', '')
        response += tail
        if self.display:
            print(tail, end='\n\n', flush=True)
        if status != StatusCode.TRITON_STREAM_END:
            session.sequence_length = offset - input_len
            yield StatusCode.TRITON_SERVER_ERR, 'the server closed the stream', 0
            return
        session.histories += prompt + response
        session.response = response
        session.status = StatusCode.TRITON_STREAM_END
        yield StatusCode.TRITON_STREAM_END, response, n_tokens

    def _detokenizer(self):
        from lmdeploy.turbomind.tokenizer import IncrementalDetokenizer
        return IncrementalDetokenizer(self.postprocess.decode)

    def _request(self, session: Session, inputs):
        """Stream one request; yields ('data', (ids, seq_len, final)) and at most one
        ('error', message). Closing the generator early cancels the request on the server."""
        import tritonclient.grpc as grpcclient
        client = grpcclient.InferenceServerClient(self.tritonserver_addr)
        responses: 'queue.Queue' = queue.Queue()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            client.async_stream_infer(MODEL, inputs, request_id=session.request_id or '',
                                      enable_empty_final_response=True)
            while True:
                result, error = responses.get()
                if error is not None:
                    finished = True
                    yield 'error', _error_text(error)
                    return
                response = result.get_response()
                final = response.parameters['triton_final_response'].bool_param \
                    if 'triton_final_response' in response.parameters else False
                ids = result.as_numpy('output_ids')
                if ids is not None:
                    seq_len = int(result.as_numpy('sequence_length').reshape(-1)[0])
                    yield 'data', (ids.reshape(-1), seq_len, final)
                if final:
                    finished = True
                    return
        finally:
            try:
                client.stop_stream(cancel_requests=not finished)
            finally:
                client.close()

    def _simple_request(self, session_id: int, input_len: int = 0, request_output_len: int = 0,
                        sequence_start: bool = False, sequence_end: bool = False, stop: bool = False,
                        step: int = 0):
        """A request that generates nothing (end, cancel); returns (status, message)."""
        probe = Session(session_id=session_id, sequence_length=step)
        inputs = self._inputs(probe, np.array([max(self.eos_id, 0)], dtype=np.uint32), input_len,
                              request_output_len, sequence_start, sequence_end, stop)
        for kind, payload in self._request(probe, inputs):
            if kind == 'error':
                return StatusCode.TRITON_SERVER_ERR, str(payload)
        return StatusCode.TRITON_STREAM_END, ''

    def end(self, session_id: int) -> StatusCode:
        """End the session on the server (frees its KV cache) and forget it here."""
        if self._session is None or self._session.session_id != session_id:
            self.logger.error(f'end: no session {session_id}')
            return StatusCode.TRITON_SESSION_INVALID_ARG
        if self._session.status == StatusCode.TRITON_SESSION_CLOSED:
            return StatusCode.TRITON_SESSION_CLOSED
        status, message = self._simple_request(session_id, sequence_end=True,
                                               step=self._session.sequence_length)
        if status == StatusCode.TRITON_STREAM_END:
            self.logger.info(f'session {session_id} ended')
        else:
            self.logger.error(f'end session {session_id} failed: {message}')
        self.reset_session()
        return status

    def cancel(self, session_id: int) -> StatusCode:
        """Stop the session's running reply (the server keeps the session)."""
        if self._session is None or self._session.session_id != session_id:
            self.logger.error(f'cancel: no session {session_id}')
            return StatusCode.TRITON_SESSION_INVALID_ARG
        if self._session.status == StatusCode.TRITON_SESSION_CLOSED:
            return StatusCode.TRITON_SESSION_CLOSED
        status, message = self._simple_request(session_id, stop=True)
        if status == StatusCode.TRITON_STREAM_END:
            self.logger.info(f'cancelled session {session_id}')
        elif 'SessionInactive' in message:  # the reply had ended already: nothing to stop
            self.logger.info(f'cancel session {session_id}: nothing is generating')
        else:
            self.logger.error(f'cancel session {session_id} failed: {message}')
        return status

    def resume(self, session_id: int) -> StatusCode:
        """Rebuild the server's KV for the session from its history text (after a loss)."""
        if self._session is None or self._session.session_id != session_id:
            self.logger.error(f'resume: no session {session_id}')
            return StatusCode.TRITON_SESSION_INVALID_ARG
        session = self._session
        histories = session.histories
        session.sequence_length = 0
        session.request_id = f'{session_id}-resume'
        status = StatusCode.TRITON_SERVER_ERR
        for status, _, _ in self._stream(session, histories, 0, True, False):
            pass
        session.histories = histories
        return status


def _error_text(error) -> str:
    message = error.message() if hasattr(error, 'message') and callable(error.message) else str(error)
    return ' '.join(str(message).split()) or type(error).__name__
