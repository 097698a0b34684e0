"""Who may call and what they may send: API keys, the model name, the request body."""
from __future__ import annotations

import json
from typing import Collection

from fastapi import Request
from pydantic import ValidationError

from .errors import APIError, bad_request, validation_error


def check_key(api_keys: Collection[str], request: Request):
    """401 unless keys are off or the request carries ``Authorization: Bearer <a key>``."""
    if not api_keys:
        return
    scheme, _, key = request.headers.get('authorization', '').partition(' ')
    if scheme.lower() != 'bearer' or key.strip() not in api_keys:
        raise APIError(401, 'invalid or missing API key; send "Authorization: Bearer KEY"',
                       'invalid_request_error', 'invalid_api_key')


def check_model(served: str, name: str):
    if name != served:
        raise APIError(404, f'the model {name!r} does not exist; this server serves {served!r}',
                       'invalid_request_error', 'model_not_found', 'model')


async def parse(request: Request, cls, served_model: str):
    """The body as a validated `cls` (protocol.py); 400 naming the first bad parameter."""
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
    check_model(served_model, req.model)
    msg = req.unsupported()
    if msg:
        raise bad_request(msg, 'unsupported_parameter')
    return req
