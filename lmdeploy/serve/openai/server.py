"""The two generation routes: check, admit, build the prompts, generate, answer.

How a request runs: the handler validates it, takes `n` slots of the admission counter (503 with
Retry-After when `max_batch_size + max_waiting` engine requests are already in flight; checked
before tokenizing), renders and tokenizes the prompt and starts one engine request per choice
(`generation.Generation`). The first update decides the status code (an engine rejection is an
HTTP error); then the same update stream becomes server-sent events or one JSON body. A client
that goes away cancels its engine requests, which frees their KV blocks.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, List, Optional, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmdeploy.turbomind.errors import EngineError, RequestError

from . import protocol as P
from .engine_client import DEFAULT_MAX_WAITING, AsyncEngine
from .errors import APIError, bad_request, engine_error
from .generation import Choice, EngineRequestFailed, Generation, Job
from .metrics import ServerMetrics
from .responses import SSE_DONE, Chunks, full_response, prompt_tokens, sse
from .sessions import make_jobs, render_chat, session_state, token_prompts
from .validation import check_key, parse

RETRY_AFTER_S = 1


class OpenAIServer:

    def __init__(self, tm, api_keys: Optional[Sequence[str]] = None,
                 max_waiting: int = DEFAULT_MAX_WAITING, model_name: Optional[str] = None):
        self.tm = tm
        self.engine = AsyncEngine(tm, max_waiting)
        self.model_name = model_name or tm.model_name
        self.api_keys = set(api_keys or ())
        self.metrics = ServerMetrics(self.model_name)

    def check_key(self, request: Request):
        check_key(self.api_keys, request)

    # --- admission -------------------------------------------------------------------------------

    def admit(self, k: int):
        engine = self.engine
        if not engine.try_admit(k):
            self.metrics.requests_rejected.inc()
            raise APIError(503, f'the server is busy: {engine.active} requests in flight '
                           f'(max_batch_size {engine.max_batch_size} + max_waiting '
                           f'{engine.max_waiting}); retry later', 'server_busy', 'server_busy',
                           headers={'Retry-After': str(RETRY_AFTER_S)})
        self.metrics.http_requests_active.set(engine.active)

    def release(self, k: int):
        self.engine.release(k)
        self.metrics.http_requests_active.set(self.engine.active)

    # --- routes ----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        arrival = time.perf_counter()
        self.check_key(request)
        req = await parse(request, P.ChatCompletionRequest, self.model_name)
        if not req.messages:
            raise bad_request('messages must not be empty', 'empty_prompt', 'messages')
        k = req.n
        self.admit(k)
        try:
            info = await session_state(self.engine, req)
            prompt = render_chat(self.engine, req.messages, first=info is None)
            jobs = make_jobs(self.engine, req, [self.engine.tokenizer.encode(prompt)], info)
        except BaseException:
            self.release(k)
            raise
        return await self.generate(request, req, jobs, 'chat', k, arrival)

    async def completions(self, request: Request):
        arrival = time.perf_counter()
        self.check_key(request)
        req = await parse(request, P.CompletionRequest, self.model_name)
        prompt = req.prompt
        n_prompts = 1 if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) \
            else len(prompt)
        if not prompt:
            raise bad_request('the prompt is empty', 'empty_prompt', 'prompt')
        if n_prompts > 1 and req.session_id is not None:
            raise bad_request('a session takes one prompt', param='prompt')
        k = req.n * n_prompts
        self.admit(k)
        try:
            info = await session_state(self.engine, req)
            jobs = make_jobs(self.engine, req, token_prompts(self.engine, prompt), info)
        except BaseException:
            self.release(k)
            raise
        return await self.generate(request, req, jobs, 'completion', k, arrival)

    # --- generating ------------------------------------------------------------------------------

    async def generate(self, request: Request, req, jobs: List[Job], kind: str, k: int,
                       arrival: float):
        """Start the jobs and answer (streamed or not). Owns the `k` admission slots."""
        choices = {j.index: Choice(j, self.engine, self.metrics, req.stop_strings(),
                                   req.ignore_eos, arrival, with_context=kind != 'chat')
                   for j in jobs}
        params = dict(top_p=req.top_p, top_k=req.top_k, temperature=req.temperature,
                      repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos)
        self.metrics.prompt_tokens.inc(prompt_tokens(req, jobs))
        gen = Generation(self.engine, jobs, choices, params, watch=request)
        updates = gen.updates()
        try:
            gen.start()
            first = await updates.__anext__()  # the status code hangs on it
        except BaseException as e:
            gen.stop_watching()
            gen.cancel()
            self.release(k)
            if isinstance(e, EngineRequestFailed):
                raise engine_error(e.error) from None
            if isinstance(e, (RequestError, EngineError)):  # from submit
                raise engine_error(e) from None
            raise
        if req.stream:
            gen.stop_watching()  # the streaming response listens for disconnects itself
            body = self._events(req, gen, updates, first, Chunks(kind, self.model_name), k)
            return StreamingResponse(body, media_type='text/event-stream',
                                     headers={'Cache-Control': 'no-cache'})
        try:
            async for _ in updates:
                pass
        except BaseException as e:
            gen.cancel()
            if isinstance(e, EngineRequestFailed):
                raise engine_error(e.error) from None
            raise
        finally:
            gen.stop_watching()
            self.release(k)
        return JSONResponse(full_response(req, jobs, choices, kind, self.model_name))

    async def _events(self, req, gen: Generation, updates: AsyncIterator, first, chunks: Chunks,
                      k: int) -> AsyncIterator[bytes]:
        finished = False
        try:
            if chunks.kind == 'chat':
                for job in gen.jobs:
                    yield chunks.role(job.index)
            item = first
            try:
                while item is not None:
                    choice, text, done = item
                    if text:
                        yield chunks.text(choice.index, text)
                    if done:
                        yield chunks.finish(choice.index, choice.finish_reason)
                    item = await updates.__anext__()
            except StopAsyncIteration:
                pass
            except EngineRequestFailed as e:
                yield sse(engine_error(e.error).body())
                gen.cancel()
            if req.include_usage():
                yield chunks.usage(prompt_tokens(req, gen.jobs),
                                   sum(c.n_tokens for c in gen.choices.values()))
            yield SSE_DONE
            finished = True
        finally:
            # A client that goes away cancels this generator (CancelledError / GeneratorExit).
            if not finished:
                gen.cancel()
            self.release(k)

