"""The engine as the asyncio server sees it: admission control, and requests woken on the loop.

No thread per request: each HTTP request's engine requests share one `LoopWaker`, handed to
the engine as their `cond`. After a step, the engine notifies every changed waker; the
`LoopBridge` collects them and wakes the event loop once (one `call_soon_threadsafe` per step,
whatever the number of requests), which then sets each waker's asyncio.Event.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Dict, List, Optional

from lmdeploy.turbomind.engine import Request

from .dummy_tokenizer import ByteTokenizer
from .metrics import engine_stats
from .protocol import MAX_SESSION_ID

ONESHOT_SESSION_BASE = MAX_SESSION_ID + 1  # the server's own session ids: 2**62 and up
DEFAULT_MAX_WAITING = 1024


class LoopBridge:
    """Wakes asyncio Events from the engine thread, coalescing the wake-ups of one step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: List[asyncio.Event] = []
        self._scheduled = False

    def waker(self) -> 'LoopWaker':
        return LoopWaker(self)

    def notify(self, event: asyncio.Event):  # engine thread
        with self._lock:
            self._pending.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _fire(self):  # event-loop thread
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for event in pending:
            event.set()


class LoopWaker:
    """The `cond` of one HTTP request's engine requests (see `Request`)."""
    __slots__ = ('_bridge', 'event')

    def __init__(self, bridge: LoopBridge):
        self._bridge = bridge
        self.event = asyncio.Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def notify_all(self):
        self._bridge.notify(self.event)


class AsyncEngine:
    """TurboMind for an asyncio server (generation runs on one event loop)."""

    def __init__(self, tm, max_waiting: int = DEFAULT_MAX_WAITING):
        self.tm = tm
        self.engine = tm.engine
        cfg = tm.config
        # A dummy model has no tokenizer: the byte-level stand-in (see dummy_tokenizer.py).
        self.tokenizer = tm.tokenizer or ByteTokenizer(cfg.vocab_size, cfg.start_id, tm.eos_id)
        self.template = tm.template
        self.session_len = tm.session_len
        self.vocab_size = cfg.vocab_size
        self.max_batch_size = cfg.max_batch_size
        self.max_waiting = max_waiting
        self.capacity = self.max_batch_size + max_waiting
        self.active = 0  # admitted engine requests (event-loop thread only)
        self.stop_ids = set(tm.stop_words) | {tm.eos_id}
        self._oneshot_ids = itertools.count(ONESHOT_SESSION_BASE)
        self._instance = tm.create_instance()  # stateless: shared by every request
        self._bridge: Optional[LoopBridge] = None  # bound to the event loop at first use

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

    # --- generation ----------------------------------------------------------------------------

    def waker(self) -> LoopWaker:
        if self._bridge is None:
            self._bridge = LoopBridge(asyncio.get_running_loop())
        return self._bridge.waker()

    def submit(self, waker: LoopWaker, session_id: int, input_ids: List[int], **kw) -> Request:
        """Start one engine request (no waiting: the engine thread admits it between steps)."""
        return self._instance.submit(session_id, input_ids, cond=waker, step=-1, **kw)[0]

    def cancel(self, request: Request):
        """Stop `request` if it still runs; it then finishes with reason 'cancel'."""
        if not request.finished:  # queued after its submit, so never too early
            try:
                self.engine.cancel_nowait(request.session_id)
            except Exception:  # noqa: BLE001 - the engine is closing
                pass

    # --- engine calls that wait for a step boundary (off the event loop) ----------------------

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def session_info(self, session_id: int) -> Optional[dict]:
        scheduler = self.engine.scheduler
        return await self.call(self.engine.call, lambda: scheduler.session_info(session_id))

    async def stats(self) -> Dict[str, int]:
        return await self.call(engine_stats, self.engine)

    async def end_session(self, session_id: int):
        await self.call(self._instance.end, session_id)

    async def alive(self) -> bool:
        return await self.call(self.engine.call, lambda: True)
