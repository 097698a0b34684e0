"""The FastAPI app: routes, error handlers and the engine's lifetime.

Routes: GET /v1/models; POST /v1/chat/completions and /v1/completions (`server.py`);
GET /health; GET /metrics (Prometheus); GET /v1/sessions/{id} and POST /v1/sessions/{id}/end
for interactive sessions.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import protocol as P
from .engine_client import DEFAULT_MAX_WAITING
from .errors import APIError, ClientGone
from .server import OpenAIServer

logger = logging.getLogger('lmdeploy.serve.openai')


def create_app(tm, api_keys: Optional[Sequence[str]] = None,
               max_waiting: int = DEFAULT_MAX_WAITING, model_name: Optional[str] = None,
               close_engine: bool = True, engine_timing: bool = False) -> FastAPI:
    """The app over the engine `tm` (a TurboMind); it closes `tm` on shutdown unless told.
    `engine_timing`: time the engine's steps by phase and print the report at shutdown."""
    server = OpenAIServer(tm, api_keys, max_waiting, model_name)

    async def lifespan(app):
        timer = None
        if engine_timing:
            from lmdeploy.turbomind.step_timer import StepTimer
            tm.engine.timer = timer = StepTimer()
        yield
        if timer is not None:
            print('engine_timing: ' + json.dumps(tm.engine.call(timer.report)), flush=True)
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
            await asyncio.wait_for(server.engine.alive(), 10)
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
