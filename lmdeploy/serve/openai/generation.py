"""One HTTP request's generation: an engine request per choice, consumed on the event loop.

    gen = Generation(engine, jobs, choices, params, watch=http_request)
    gen.start()
    async for choice, text, done in gen.updates():   # text safe to send; done: choice over
        ...

`updates` is the one consume loop of the server: streamed and non-streamed responses both read
it. It wakes when the engine has stepped (see `engine_client.LoopWaker`), turns new token ids
into text (incremental detokenizing, stop strings held back) and takes the finish reason from
the engine (`Request.reason`); a stop string found here cancels the engine request. With `watch`
set (before a streamed response starts, and for a non-streamed one) a client that disconnects
raises `ClientGone`; an engine error raises `EngineRequestFailed`.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple

from lmdeploy.turbomind.engine import Request

from .engine_client import AsyncEngine
from .errors import ClientGone
from .metrics import ServerMetrics
from .stop_strings import StopStringMatcher

# The engine's finish reasons (Request.reason) in OpenAI's words.
FINISH_REASONS = {'stop': 'stop', 'length': 'length', 'cancel': 'abort', 'error': 'abort'}


class EngineRequestFailed(Exception):
    """The engine failed a choice's request; `error` is the engine's exception."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@dataclass
class Job:
    """One engine request: one choice of one prompt."""
    index: int
    session_id: int
    input_ids: List[int]
    max_tokens: int
    sequence_start: bool
    sequence_end: bool
    seed: Optional[int]
    request: Optional[Request] = None
    seen: int = 0  # output ids consumed so far


class Choice:
    """Turns one job's token ids into text: incremental detokenizing, stop strings, reason."""

    def __init__(self, job: Job, engine: AsyncEngine, metrics: ServerMetrics,
                 stops: Sequence[str], ignore_eos: bool, arrival: float, with_context: bool):
        self.job = job
        self.index = job.index
        # Completions continue the prompt's text (' Paris' after 'The capital is'); a chat reply
        # is a text of its own, decoded like decode(reply_ids).
        context = job.input_ids[-8:] if with_context else ()
        self.detok = engine.tokenizer.detokenizer(context_ids=context)
        self.matcher = StopStringMatcher(stops)
        self.stop_ids = set() if ignore_eos else engine.stop_ids
        self.metrics = metrics
        self.timer = engine.engine.timer  # --engine_timing: where first tokens spend time
        self.arrival = arrival
        self.last_time: Optional[float] = None
        self.n_tokens = 0
        self.finish_reason: Optional[str] = None
        self.text_parts: List[str] = []

    @property
    def stopped(self) -> bool:
        """A stop string matched: later tokens are dropped."""
        return self.matcher.stopped

    def on_tokens(self, ids: List[int]) -> str:
        now = time.perf_counter()
        if self.last_time is None:
            self.metrics.ttft.observe(now - self.arrival)
            request = self.job.request
            if self.timer is not None and request.stamps:
                self.timer.observe('ttft_server_in', request.submitted - self.arrival)
                self.timer.observe('ttft_server_out', now - request.stamps[0][0])
        else:
            gap = (now - self.last_time) / len(ids)
            for _ in ids:
                self.metrics.itl.observe(gap)
        self.last_time = now
        self.metrics.generated_tokens.inc(len(ids))
        self.n_tokens += len(ids)
        if self.stopped:  # tokens still in flight after a stop string
            return ''
        visible = [t for t in ids if t not in self.stop_ids]
        text = self.matcher.feed(self.detok.step(visible))
        self.text_parts.append(text)
        return text

    def on_end(self, engine_reason: str) -> str:
        """The held-back text; sets the finish reason (the engine's, unless a stop string)."""
        text = ''
        if self.stopped:
            self.finish_reason = 'stop'
        else:
            text = self.matcher.feed(self.detok.flush()) + self.matcher.flush()
            self.finish_reason = 'stop' if self.stopped else FINISH_REASONS.get(engine_reason,
                                                                                'abort')
            self.text_parts.append(text)
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        self.metrics.finished(self.finish_reason)
        return text

    @property
    def text(self) -> str:
        return ''.join(self.text_parts)


class Generation:

    def __init__(self, engine: AsyncEngine, jobs: List[Job], choices: Dict[int, Choice],
                 params: dict, watch=None):
        self.engine = engine
        self.jobs = jobs
        self.choices = choices
        self.params = params
        self.watch = watch  # a Starlette request whose disconnect ends the wait
        self.waker = engine.waker()
        self._watcher: Optional[asyncio.Future] = None

    def start(self):
        """Submit every job (a bad argument raises the engine's RequestError here)."""
        for job in self.jobs:
            job.request = self.engine.submit(
                self.waker, job.session_id, job.input_ids, request_output_len=job.max_tokens,
                sequence_start=job.sequence_start, sequence_end=job.sequence_end,
                random_seed=job.seed, **self.params)

    def cancel(self):
        """Stop every engine request that still runs (a gone client, an error)."""
        for job in self.jobs:
            if job.request is not None:
                self.engine.cancel(job.request)

    def stop_watching(self):
        """Leave disconnects to someone else (a streaming response listens for them itself)."""
        self.watch = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def updates(self) -> AsyncIterator[Tuple[Choice, str, bool]]:
        """(choice, text, done) whenever a choice got tokens or finished, until all are done."""
        pending = [j for j in self.jobs]
        while pending:
            await self._wait()
            still = []
            for job in pending:
                r = job.request
                done = r.finished  # first: the engine sets it after the last tokens are in
                if r.error is not None:
                    raise EngineRequestFailed(r.error)
                choice = self.choices[job.index]
                n = len(r.output_ids)
                text, changed = '', False
                if n > job.seen:
                    was_stopped = choice.stopped
                    text = choice.on_tokens(r.output_ids[job.seen:n])
                    job.seen, changed = n, True
                    if choice.stopped and not was_stopped:
                        self.engine.cancel(r)
                if done:
                    text += choice.on_end(r.reason)
                else:
                    still.append(job)
                if changed or done:
                    yield choice, text, done
            pending = still

    async def _wait(self):
        event = self.waker.event
        if self.watch is None:
            await event.wait()
        else:
            if self._watcher is None:
                self._watcher = asyncio.ensure_future(_wait_disconnect(self.watch))
            if self._watcher.done():
                raise ClientGone()
            if not event.is_set():
                waiting = asyncio.ensure_future(event.wait())
                await asyncio.wait({waiting, self._watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    raise ClientGone()
        event.clear()  # before reading the requests: a later step sets it again


async def _wait_disconnect(request):
    """Return once the client has gone (its request body was read already)."""
    while True:
        message = await request.receive()
        if message.get('type') == 'http.disconnect':
            return
