"""Error responses in OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``."""
from __future__ import annotations

from typing import Any, Dict, Optional

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from . import protocol as P


class APIError(Exception):
    """An error response: HTTP `status` and OpenAI's error body."""

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


class ClientGone(Exception):
    """The client disconnected before the response was complete."""


def bad_request(message: str, code: str = 'invalid_value',
                param: Optional[str] = None) -> APIError:
    return APIError(400, message, 'invalid_request_error', code, param)


def engine_error(e: Exception) -> APIError:
    """The HTTP error for an exception raised (or reported) by the engine."""
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
    """The first pydantic error as a 400 naming the parameter."""
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
