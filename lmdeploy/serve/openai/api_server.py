"""OpenAI-compatible HTTP server over the TurboMind engine.

    python -m lmdeploy.serve.openai.api_server ./workspace --server_port 23333 \\
        [--api_keys KEY ...] [--max_waiting 1024] [--max_batch_size 32] [--session_len N]

Routes: GET /v1/models; POST /v1/chat/completions and /v1/completions (streamed as server-sent
events ending with `data: [DONE]`, or not); GET /health; GET /metrics (Prometheus);
GET /v1/sessions/{id} and POST /v1/sessions/{id}/end for interactive sessions (v0.0.6's
`session_id` + `interactive_mode`: the engine keeps the conversation's KV cache between calls, so
a later turn sends only its new messages). See docs/en/restful_api.md.

How a request runs: the handler validates it, takes `n` slots of the admission counter (503 with
Retry-After when `max_batch_size + max_waiting` engine requests are already in flight; checked
before tokenizing), renders and tokenizes the prompt, and starts one engine request per choice.
Each engine request is iterated by its own worker thread (`stream_infer` is blocking), which
hands new token ids to the event loop through an asyncio queue. The event loop detokenizes
incrementally, holds back text that may start a stop string, and writes the response. A client
that goes away cancels its engine requests, which frees their KV blocks.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from . import protocol as P
from .metrics import ServerMetrics, engine_stats
from .stop_strings import StopStringMatcher

logger = logging.getLogger('lmdeploy.serve.openai')

ONESHOT_SESSION_BASE = P.MAX_SESSION_ID + 1  # the server's own session ids: 2**62 and up
DEFAULT_MAX_WAITING = 1024
RETRY_AFTER_S = 1


# ------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error response in OpenAI's envelope."""

    def __init__(self, status: int, message: str, type_: str = 'invalid_request_error',
                 code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.headers = param, headers

    def body(self) -> Dict[str, Any]:
        return P.error_body(self.message, self.type, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, code: str = 'invalid_value', param: Optional[str] = None):
    return APIError(400, message, 'invalid_request_error', code, param)


def engine_error(e: Exception) -> APIError:
    """The HTTP error for an exception raised by the engine API."""
    from lmdeploy.turbomind import errors as E
    msg = ' '.join(str(e).split()) or type(e).__name__
    if isinstance(e, E.SessionTooLong):
        return APIError(400, msg, 'invalid_request_error', 'context_length_exceeded')
    if isinstance(e, (E.SessionBusy, E.SessionConflict)):
        return APIError(409, msg, 'invalid_request_error', 'session_busy')
    if isinstance(e, E.SessionInactive):
        return APIError(404, msg, 'invalid_request_error', 'session_not_found')
    if isinstance(e, E.NoCapacity):
        return APIError(400, msg, 'invalid_request_error', 'context_length_exceeded')
    if isinstance(e, E.RequestError):
        return APIError(400, msg, 'invalid_request_error', 'invalid_value')
    return APIError(500, msg, 'server_error', 'engine_error')


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = '.'.join(str(x) for x in err.get('loc', ()))
    msg = err.get('msg', 'invalid value')
    if msg.startswith('Value error, '):
        msg = msg[len('Value error, '):]
    got = err.get('input')
    text = f'{loc}: {msg}' if loc else msg
    if err.get('type') != 'missing' and not isinstance(got, (dict, list)):
        text += f' (got {got!r})'
    code = 'missing_required_parameter' if err.get('type') == 'missing' else 'invalid_value'
    return bad_request(text, code, loc or None)


# ------------------------------------------------------------------------------------------
# Engine requests


@dataclass
class Job:
    """One engine request: one choice of one prompt."""
    index: int
    session_id: int
    input_ids: List[int]
    max_tokens: int
    sequence_start: bool
    sequence_end: bool
    history: int  # tokens the session already holds
    seed: Optional[int]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: bool = False  # handed to the engine
    started: bool = False  # the engine yielded for it (it is running)


class AsyncEngine:
    """TurboMind for an asyncio server: admission control and one worker thread per request."""

    def __init__(self, tm, max_waiting: int = DEFAULT_MAX_WAITING):
        self.tm = tm
        self.engine = tm.engine
        self.tokenizer = tm.tokenizer
        self.template = tm.template
        self.session_len = tm.session_len
        self.max_batch_size = tm.config.max_batch_size
        self.max_waiting = max_waiting
        self.capacity = self.max_batch_size + max_waiting
        self.active = 0  # admitted engine requests (event-loop thread only)
        self.stop_ids = set(tm.stop_words) | {tm.eos_id}
        self._oneshot_ids = itertools.count(ONESHOT_SESSION_BASE)
        self._instance = tm.create_instance()  # for end / cancel (stateless)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.capacity + 4, thread_name_prefix='openai-stream')

    # --- admission ---------------------------------------------------------------------------

    def try_admit(self, k: int) -> bool:
        if self.active + k > self.capacity:
            return False
        self.active += k
        return True

    def release(self, k: int):
        self.active -= k

    def oneshot_session(self) -> int:
        return next(self._oneshot_ids)

    # --- engine calls off the event loop -------------------------------------------------------

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def session_info(self, session_id: int) -> Optional[dict]:
        scheduler = self.engine.scheduler
        return await self.call(self.engine.call, lambda: scheduler.session_info(session_id))

    async def stats(self) -> Dict[str, int]:
        return await self.call(engine_stats, self.engine)

    async def end_session(self, session_id: int):
        await self.call(self._instance.end, session_id)

    async def cancel(self, job: Job):
        """Stop `job`: its worker stops at the engine's next step (closing the stream cancels
        the engine request); a request still queued in the engine is cancelled right away."""
        job.cancelled.set()
        if job.submitted and not job.started:
            try:
                await self.call(self.engine.cancel, job.session_id, False)
            except Exception:  # noqa: BLE001 - finished already, or the engine is closing
                pass

    def close(self):
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- streaming -----------------------------------------------------------------------------

    def start(self, job: Job, params: dict, queue: asyncio.Queue):
        """Run `job` on a worker thread; it puts (index, kind, payload) items on `queue`:
        ('tokens', [ids]) as they come, then ('end', n_tokens) or ('error', exception)."""
        loop = asyncio.get_running_loop()

        def push(kind, payload):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (job.index, kind, payload))
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        def work():
            seen = 0
            gen = None
            try:
                if job.cancelled.is_set():
                    push('end', 0)
                    return
                gen = self.tm.create_instance().stream_infer(
                    job.session_id, job.input_ids, request_output_len=job.max_tokens,
                    sequence_start=job.sequence_start, sequence_end=job.sequence_end,
                    step=-1, random_seed=job.seed, stream_output=True, **params)
                job.submitted = True
                for outputs in gen:
                    job.started = True
                    ids, n = outputs[0]
                    if n > seen:
                        push('tokens', ids[seen:n].tolist())
                        seen = n
                    if job.cancelled.is_set():
                        break
                push('end', seen)
            except BaseException as e:  # noqa: BLE001 - handed to the event loop
                push('error', e)
            finally:
                if gen is not None:
                    gen.close()  # cancels the engine request if it is still running

        self._pool.submit(work)


class Choice:
    """Turns one job's token ids into text: incremental detokenizing, stop strings, reason."""

    def __init__(self, server: 'OpenAIServer', job: Job, stops: Sequence[str], ignore_eos: bool,
                 arrival: float, with_context: bool):
        self.job = job
        self.index = job.index
        # Completions continue the prompt's text (' Paris' after 'The capital is'); a chat reply
        # is a text of its own, decoded like decode(reply_ids).
        context = job.input_ids[-8:] if with_context else ()
        self.detok = server.engine.tokenizer.detokenizer(context_ids=context)
        self.matcher = StopStringMatcher(stops)
        self.stop_ids = set() if ignore_eos else server.engine.stop_ids
        self.session_len = server.engine.session_len
        self.metrics = server.metrics
        self.arrival = arrival
        self.last_time: Optional[float] = None
        self.n_tokens = 0
        self.last_token: Optional[int] = None
        self.finish_reason: Optional[str] = None
        self.text_parts: List[str] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def on_tokens(self, ids: List[int]) -> str:
        now = time.perf_counter()
        if self.last_time is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            gap = (now - self.last_time) / len(ids)
            for _ in ids:
                self.metrics.itl.observe(gap)
        self.last_time = now
        self.metrics.generated_tokens.inc(len(ids))
        self.n_tokens += len(ids)
        self.last_token = ids[-1]
        if self.done:  # stopped by a stop string; tokens still in flight are dropped
            return ''
        visible = [t for t in ids if t not in self.stop_ids]
        text = self.matcher.feed(self.detok.step(visible))
        if self.matcher.stopped:
            self.finish_reason = 'stop'
        self.text_parts.append(text)
        return text

    def on_end(self) -> str:
        """The held-back text; sets the finish reason."""
        text = ''
        if not self.done:
            text = self.matcher.feed(self.detok.flush())
            text += self.matcher.flush()
            job = self.job
            if self.matcher.stopped or (self.last_token is not None
                                        and self.last_token in self.stop_ids):
                self.finish_reason = 'stop'
            elif (self.n_tokens >= job.max_tokens
                  or job.history + len(job.input_ids) + self.n_tokens >= self.session_len - 1):
                self.finish_reason = 'length'
            else:
                self.finish_reason = 'abort'
            self.text_parts.append(text)
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        self.metrics.finished(self.finish_reason)
        return text

    @property
    def text(self) -> str:
        return ''.join(self.text_parts)


# ------------------------------------------------------------------------------------------
# The server


class OpenAIServer:

    def __init__(self, tm, api_keys: Optional[Sequence[str]] = None,
                 max_waiting: int = DEFAULT_MAX_WAITING, model_name: Optional[str] = None):
        self.tm = tm
        self.engine = AsyncEngine(tm, max_waiting)
        self.model_name = model_name or tm.model_name
        self.api_keys = set(api_keys or ())
        self.metrics = ServerMetrics(self.model_name)

    # --- checks --------------------------------------------------------------------------------

    def check_key(self, request: Request):
        if not self.api_keys:
            return
        auth = request.headers.get('authorization', '')
        scheme, _, key = auth.partition(' ')
        if scheme.lower() != 'bearer' or key.strip() not in self.api_keys:
            raise APIError(401, 'invalid or missing API key; send "Authorization: Bearer KEY"',
                           'invalid_request_error', 'invalid_api_key')

    def check_model(self, name: str):
        if name != self.model_name:
            raise APIError(404, f'the model {name!r} does not exist; this server serves '
                           f'{self.model_name!r}', 'invalid_request_error', 'model_not_found',
                           'model')

    async def parse(self, request: Request, cls):
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise bad_request('the request body is not valid JSON', 'invalid_json') from None
        if not isinstance(raw, dict):
            raise bad_request('the request body must be a JSON object', 'invalid_json')
        try:
            req = cls.model_validate(raw)
        except ValidationError as e:
            raise validation_error(e) from None
        self.check_model(req.model)
        msg = req.unsupported()
        if msg:
            raise bad_request(msg, 'unsupported_parameter')
        return req

    def admit(self, k: int):
        if not self.engine.try_admit(k):
            self.metrics.requests_rejected.inc()
            raise APIError(503, f'the server is busy: {self.engine.active} requests in flight '
                           f'(max_batch_size {self.engine.max_batch_size} + max_waiting '
                           f'{self.engine.max_waiting}); retry later', 'server_busy',
                           'server_busy', headers={'Retry-After': str(RETRY_AFTER_S)})
        self.metrics.http_requests_active.set(self.engine.active)

    def release(self, k: int):
        self.engine.release(k)
        self.metrics.http_requests_active.set(self.engine.active)

    # --- prompt rendering ------------------------------------------------------------------------

    def encode(self, text: str) -> List[int]:
        return self.engine.tokenizer.encode(text)

    def render_chat(self, messages: List[P.ChatMessage], first: bool) -> str:
        template = self.engine.template
        try:
            dicts = [{'role': m.role, 'content': m.text()} for m in messages]
        except ValueError as e:
            raise bad_request(str(e), param='messages') from None
        if first:
            try:
                return template.messages2prompt(dicts)
            except ValueError as e:
                raise bad_request(str(e), param='messages') from None
        parts = []  # a later turn of a session: only the new messages, in later-turn form
        for m in dicts:
            if m['role'] == 'system':
                raise bad_request('a system message is only allowed in the first turn of a '
                                  'session', param='messages')
            if m['role'] == 'user':
                parts.append(template.get_prompt(m['content'], False))
            else:
                parts.append(m['content'] + template.assistant_end)
        return ''.join(parts)

    async def session_state(self, req) -> Optional[dict]:
        """The engine's record of the request's session (None: a new session)."""
        if req.session_id is None:
            if req.interactive_mode:
                raise bad_request('interactive_mode needs a session_id', param='session_id')
            return None
        if req.n != 1:
            raise bad_request('n must be 1 with a session_id', param='n')
        return await self.engine.session_info(req.session_id)

    def make_jobs(self, req, prompts: List[List[int]], info: Optional[dict]) -> List[Job]:
        history = len(info['tokens']) if info else 0
        limit = self.engine.session_len - 1
        jobs = []
        for p, ids in enumerate(prompts):
            if not ids:
                raise bad_request('the prompt is empty', 'empty_prompt', 'prompt')
            if history + len(ids) > limit:
                what = f'the session history ({history} tokens) plus the prompt' if history \
                    else 'the prompt'
                raise bad_request(f'{what} ({len(ids)} tokens) does not fit the context of '
                                  f'{self.engine.session_len} tokens (at most {limit} with '
                                  'room for one generated token)', 'context_length_exceeded')
            max_tokens = req.max_tokens if req.max_tokens is not None \
                else self.engine.session_len - history - len(ids) - 1
            for i in range(req.n):
                if req.session_id is not None:
                    sid, start, end = req.session_id, info is None, not req.interactive_mode
                else:
                    sid, start, end = self.engine.oneshot_session(), True, True
                seed = None if req.seed is None else req.seed + i
                jobs.append(Job(p * req.n + i, sid, ids, max_tokens, start, end, history, seed))
        return jobs

    @staticmethod
    def sampling(req) -> dict:
        return dict(top_p=req.top_p, top_k=req.top_k, temperature=req.temperature,
                    repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos)

    # --- running ---------------------------------------------------------------------------------

    async def run(self, request: Request, req, jobs: List[Job], kind: str, k: int):
        """Start the jobs and answer (streamed or not). Owns the `k` admission slots."""
        arrival = request.state.arrival
        queue: asyncio.Queue = asyncio.Queue()
        params = self.sampling(req)
        choices = {j.index: Choice(self, j, req.stop_strings(), req.ignore_eos, arrival,
                                   with_context=kind != 'chat') for j in jobs}
        self.metrics.prompt_tokens.inc(sum(len(j.input_ids) for j in jobs[::req.n]))
        for job in jobs:
            self.engine.start(job, params, queue)
        try:
            # The first event decides the status code: an engine rejection is an HTTP error.
            first = await self._next(queue, request, jobs)
        except BaseException:
            self._stop_watching(request)
            await self._cancel_all(jobs)
            self.release(k)
            raise
        self._stop_watching(request)
        if first[1] == 'error':
            await self._cancel_all(jobs)
            self.release(k)
            raise engine_error(first[2])
        if req.stream:
            body = self._stream(request, req, jobs, choices, queue, first, kind, k)
            return StreamingResponse(body, media_type='text/event-stream',
                                     headers={'Cache-Control': 'no-cache'})
        try:
            pending = len(jobs)
            item = first
            while True:
                index, what, payload = item
                choice = choices[index]
                if what == 'tokens':
                    choice.on_tokens(payload)
                    if choice.done:
                        await self._cancel(choice.job)
                elif what == 'end':
                    choice.on_end()
                    pending -= 1
                else:
                    raise engine_error(payload)
                if not pending:
                    break
                item = await self._next(queue, request, jobs)
        except BaseException:
            await self._cancel_all(jobs)
            raise
        finally:
            self._stop_watching(request)
            self.release(k)
        return JSONResponse(self._full_response(req, jobs, choices, kind))

    async def _next(self, queue: asyncio.Queue, request: Request, jobs: List[Job]):
        """The next worker event; raises ClientGone if the client disconnects meanwhile."""
        watcher = getattr(request.state, 'watcher', None)
        if watcher is None:
            watcher = request.state.watcher = asyncio.ensure_future(_wait_disconnect(request))
        if watcher.done():
            raise ClientGone()
        get = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        raise ClientGone()

    @staticmethod
    def _stop_watching(request: Request):
        watcher = getattr(request.state, 'watcher', None)
        if watcher is not None:
            watcher.cancel()
            request.state.watcher = None

    async def _cancel(self, job: Job):
        await self.engine.cancel(job)

    async def _cancel_all(self, jobs: List[Job]):
        await asyncio.gather(*(self.engine.cancel(j) for j in jobs), return_exceptions=True)

    def _full_response(self, req, jobs, choices, kind) -> dict:
        prompt_tokens = sum(len(j.input_ids) for j in jobs[::req.n])
        completion_tokens = sum(c.n_tokens for c in choices.values())
        ordered = [choices[j.index] for j in jobs]
        if kind == 'chat':
            out = [{'index': c.index, 'message': {'role': 'assistant', 'content': c.text},
                    'logprobs': None, 'finish_reason': c.finish_reason} for c in ordered]
            obj, prefix = 'chat.completion', 'chatcmpl'
        else:
            out = [{'index': c.index, 'text': c.text, 'logprobs': None,
                    'finish_reason': c.finish_reason} for c in ordered]
            obj, prefix = 'text_completion', 'cmpl'
        body = {'id': P.new_id(prefix), 'object': obj, 'created': P.now(),
                'model': self.model_name, 'choices': out,
                'usage': P.usage(prompt_tokens, completion_tokens)}
        if req.session_id is not None:
            body['session_id'] = req.session_id
        return body

    async def _stream(self, request, req, jobs, choices, queue, first, kind, k
                      ) -> AsyncIterator[bytes]:
        rid = P.new_id('chatcmpl' if kind == 'chat' else 'cmpl')
        created = P.now()
        obj = 'chat.completion.chunk' if kind == 'chat' else 'text_completion'

        def chunk(index, text=None, finish=None, role=False):
            if kind == 'chat':
                delta = {}
                if role:
                    delta['role'] = 'assistant'
                if text is not None:
                    delta['content'] = text
                c = {'index': index, 'delta': delta, 'logprobs': None, 'finish_reason': finish}
            else:
                c = {'index': index, 'text': text or '', 'logprobs': None,
                     'finish_reason': finish}
            body = {'id': rid, 'object': obj, 'created': created, 'model': self.model_name,
                    'choices': [c]}
            return b'data: ' + json.dumps(body, ensure_ascii=False).encode() + b'\n\n'

        finished = False
        try:
            if kind == 'chat':
                for job in jobs:
                    yield chunk(job.index, '', role=True)
            pending = len(jobs)
            item = first
            while True:
                index, what, payload = item
                choice = choices[index]
                if what == 'tokens':
                    was_done = choice.done
                    text = choice.on_tokens(payload)
                    if text:
                        yield chunk(index, text)
                    if choice.done and not was_done:
                        await self._cancel(choice.job)
                elif what == 'end':
                    text = choice.on_end()
                    if text:
                        yield chunk(index, text)
                    yield chunk(index, None if kind == 'chat' else '', choice.finish_reason)
                    pending -= 1
                else:
                    err = engine_error(payload)
                    yield b'data: ' + json.dumps(err.body()).encode() + b'\n\n'
                    break
                if not pending:
                    break
                item = await queue.get()
            if req.include_usage():
                prompt_tokens = sum(len(j.input_ids) for j in jobs[::req.n])
                body = {'id': rid, 'object': obj, 'created': created, 'model': self.model_name,
                        'choices': [], 'usage': P.usage(
                            prompt_tokens, sum(c.n_tokens for c in choices.values()))}
                yield b'data: ' + json.dumps(body).encode() + b'\n\n'
            yield b'data: [DONE]\n\n'
            finished = True
        finally:
            # A client that goes away cancels this generator (CancelledError / GeneratorExit).
            if not finished:
                await asyncio.shield(self._cancel_all(jobs))
            self.release(k)

    # --- routes ----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        request.state.arrival = time.perf_counter()
        self.check_key(request)
        req = await self.parse(request, P.ChatCompletionRequest)
        if not req.messages:
            raise bad_request('messages must not be empty', 'empty_prompt', 'messages')
        k = req.n
        self.admit(k)
        try:
            info = await self.session_state(req)
            prompt = self.render_chat(req.messages, first=info is None)
            jobs = self.make_jobs(req, [self.encode(prompt)], info)
        except BaseException:
            self.release(k)
            raise
        return await self.run(request, req, jobs, 'chat', k)

    async def completions(self, request: Request):
        request.state.arrival = time.perf_counter()
        self.check_key(request)
        req = await self.parse(request, P.CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise bad_request('the prompt is empty', 'empty_prompt', 'prompt')
        if len(prompts) > 1 and req.session_id is not None:
            raise bad_request('a session takes one prompt', param='prompt')
        k = req.n * len(prompts)
        self.admit(k)
        try:
            info = await self.session_state(req)
            vocab = self.tm.config.vocab_size
            ids = []
            for p in prompts:
                if isinstance(p, str):
                    ids.append(self.encode(p))
                else:
                    if any(not 0 <= t < vocab for t in p):
                        raise bad_request(f'token ids must be in [0, {vocab})', param='prompt')
                    ids.append(list(p))
            jobs = self.make_jobs(req, ids, info)
        except BaseException:
            self.release(k)
            raise
        return await self.run(request, req, jobs, 'completion', k)


class ClientGone(Exception):
    """The client disconnected before the response was complete."""


async def _wait_disconnect(request: Request):
    """Return once the client has gone (its request body was read already)."""
    while True:
        message = await request.receive()
        if message.get('type') == 'http.disconnect':
            return


def create_app(tm, api_keys: Optional[Sequence[str]] = None,
               max_waiting: int = DEFAULT_MAX_WAITING, model_name: Optional[str] = None,
               close_engine: bool = True) -> FastAPI:
    """The FastAPI app over the engine `tm` (a TurboMind)."""
    server = OpenAIServer(tm, api_keys, max_waiting, model_name)

    async def lifespan(app):
        yield
        server.engine.close()
        if close_engine:
            tm.close()

    app = FastAPI(title='LMDeploy OpenAI-compatible API', lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        server.metrics.error(e.status)
        return e.response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        server.metrics.error(499)
        return Response(status_code=499)

    @app.get('/health')
    async def health():
        try:
            await asyncio.wait_for(server.engine.call(tm.engine.call, lambda: True), 10)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({'status': 'error', 'message': str(e)}, status_code=503)
        return {'status': 'ok'}

    @app.get('/v1/models')
    async def models(request: Request):
        server.check_key(request)
        return {'object': 'list', 'data': [P.model_card(server.model_name, tm.model_path)]}

    @app.post('/v1/chat/completions')
    async def chat_completions(request: Request):
        return await server.chat_completions(request)

    @app.post('/v1/completions')
    async def completions(request: Request):
        return await server.completions(request)

    async def existing_session(session_id: int, request: Request) -> dict:
        server.check_key(request)
        info = await server.engine.session_info(session_id) \
            if 0 <= session_id <= P.MAX_SESSION_ID else None
        if info is None:
            raise APIError(404, f'session {session_id} does not exist', code='session_not_found')
        return info

    @app.get('/v1/sessions/{session_id}')
    async def session(session_id: int, request: Request):
        info = await existing_session(session_id, request)
        return {'session_id': session_id, 'tokens': len(info['tokens']),
                'cached_tokens': int(info['num_cached']), 'status': str(info['status'])}

    @app.post('/v1/sessions/{session_id}/end')
    async def end_session(session_id: int, request: Request):
        await existing_session(session_id, request)
        await server.engine.end_session(session_id)
        return {'session_id': session_id, 'ended': True}

    @app.get('/metrics')
    async def metrics(request: Request):
        server.check_key(request)
        try:
            server.metrics.set_engine(await asyncio.wait_for(server.engine.stats(), 10))
        except Exception:  # noqa: BLE001 - a dead engine still lets the counters be read
            logger.exception('reading engine stats failed')
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    return app


# ------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='python -m lmdeploy.serve.openai.api_server',
        description='Serve a TurboMind workspace over an OpenAI-compatible HTTP API.')
    p.add_argument('model_path', help='workspace written by lmdeploy.serve.turbomind.deploy')
    p.add_argument('--server_name', default='127.0.0.1',
                   help='address to listen on (default: %(default)s; 0.0.0.0 for all)')
    p.add_argument('--server_port', type=int, default=23333, help='port (default: %(default)s)')
    p.add_argument('--tp', type=int, default=1, help='tensor-parallel degree (default: 1)')
    p.add_argument('--api_keys', nargs='+', default=None, metavar='KEY',
                   help='accepted API keys (Authorization: Bearer KEY); default: no auth. '
                        '/health stays open')
    p.add_argument('--max_waiting', type=int, default=DEFAULT_MAX_WAITING,
                   help='engine requests that may wait beyond max_batch_size; more get 503 with '
                        'Retry-After (default: %(default)s)')
    p.add_argument('--model_name', default=None,
                   help="model name clients send (default: the workspace's model_name)")
    p.add_argument('--instance_num', type=int, default=None,
                   help="v0.0.6's flag: accepted for compatibility, same as --max_batch_size")
    g = p.add_argument_group('engine overrides (config.ini keys)')
    g.add_argument('--max_batch_size', type=int, default=None, help='persistent batch size')
    g.add_argument('--session_len', type=int, default=None, help='context length per session')
    g.add_argument('--cache_max_entry_count', type=float, default=None,
                   help='KV pool: <= 1 fraction of free memory, > 1 number of sessions')
    g.add_argument('--num_blocks', type=int, default=None, help='KV pool size in blocks')
    g.add_argument('--block_size', type=int, default=None, help='tokens per KV block')
    g.add_argument('--max_prefill_tokens', type=int, default=None,
                   help='token budget of one step\'s prefill chunks')
    g.add_argument('--quant_policy', type=int, default=None, choices=(0, 4),
                   help='4: int8 KV cache')
    g.add_argument('--dtype', default=None, choices=('fp16', 'bf16', 'fp32'),
                   help='compute dtype (default: fp16 on GPU, fp32 on CPU)')
    g.add_argument('--device', default=None, help="'cpu', 'cuda' or 'cuda:N'")
    p.add_argument('--log_level', default='info',
                   choices=('critical', 'error', 'warning', 'info', 'debug'),
                   help='uvicorn log level (default: %(default)s)')
    args = p.parse_args(argv)
    if args.max_waiting < 0:
        p.error('--max_waiting must be >= 0')
    if not 0 < args.server_port < 65536:
        p.error('--server_port must be in 1..65535')
    return args


ENGINE_KEYS = ('max_batch_size', 'session_len', 'cache_max_entry_count', 'num_blocks',
               'block_size', 'max_prefill_tokens', 'quant_policy', 'dtype', 'device')


def main(argv=None):
    args = parse_args(argv)
    import uvicorn

    from lmdeploy.turbomind import TurboMind
    overrides = {k: getattr(args, k) for k in ENGINE_KEYS if getattr(args, k) is not None}
    if args.instance_num is not None:
        overrides.setdefault('max_batch_size', args.instance_num)
    try:
        tm = TurboMind(args.model_path, tp=args.tp, **overrides)
    except Exception as e:  # noqa: BLE001 - a one-line error for the user
        print(f'error: {" ".join(str(e).split()) or type(e).__name__}', file=sys.stderr)
        sys.exit(1)
    if tm.tokenizer is None:
        print(f'error: {args.model_path} has no tokenizer (triton_models/tokenizer)',
              file=sys.stderr)
        sys.exit(1)
    app = create_app(tm, args.api_keys, args.max_waiting, args.model_name)
    print(f'serving {tm.model_name!r} on http://{args.server_name}:{args.server_port} '
          f'(max_batch_size {tm.config.max_batch_size}, max_waiting {args.max_waiting}, '
          f'session_len {tm.session_len}, auth {"on" if args.api_keys else "off"})', flush=True)
    uvicorn.run(app, host=args.server_name, port=args.server_port, log_level=args.log_level,
                timeout_keep_alive=30)


if __name__ == '__main__':
    main()
