"""Request and response bodies of the OpenAI-compatible server (pydantic v2).

Requests follow OpenAI's chat/completions and completions APIs; every numeric parameter is
range-checked here, so a bad value becomes a 400 naming the parameter. Extensions (LMDeploy
v0.0.6's api_server): `top_k`, `repetition_penalty`, `ignore_eos`, `session_id` and
`interactive_mode`. Fields that OpenAI defines but this server does not implement are accepted
at their neutral value and refused otherwise (`unsupported()`); unknown fields are ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_SESSION_ID = (1 << 62) - 1  # ids from 2**62 up are the server's own one-shot sessions


class _Request(BaseModel):
    model_config = ConfigDict(extra='ignore')

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: no top-k limit
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: Optional[int] = Field(None, ge=0, le=(1 << 63) - 1)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    ignore_eos: bool = False
    user: Optional[str] = None
    logit_bias: Optional[Dict[str, float]] = None
    logprobs: Optional[Any] = None
    # v0.0.6's interactive sessions
    session_id: Optional[int] = Field(None, ge=0, le=MAX_SESSION_ID)
    interactive_mode: bool = False

    @field_validator('stop')
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f'at most {MAX_STOP_STRINGS} stop strings')
        if any(not s for s in stops):
            raise ValueError('stop strings must not be empty')
        return stops

    def stop_strings(self) -> List[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get('include_usage'))

    def unsupported(self) -> Optional[str]:
        """The first parameter set to a value this server does not implement, as a message."""
        if self.presence_penalty or self.frequency_penalty:
            return ('presence_penalty and frequency_penalty are not supported; use '
                    'repetition_penalty')
        if self.logit_bias:
            return 'logit_bias is not supported'
        if self.logprobs not in (None, False, 0):
            return 'logprobs are not supported'
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra='ignore')

    role: Literal['system', 'user', 'assistant']
    content: Union[str, List[Dict[str, Any]], None] = ''

    def text(self) -> str:
        if self.content is None:
            return ''
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get('type') != 'text' or not isinstance(part.get('text'), str):
                raise ValueError('only text content parts are supported')
            parts.append(part['text'])
        return ''.join(parts)


class ChatCompletionRequest(_Request):
    messages: List[ChatMessage]


class CompletionRequest(_Request):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return 'echo is not supported'
        if self.best_of not in (None, 1) and self.best_of != self.n:
            return 'best_of is not supported'
        if self.suffix:
            return 'suffix is not supported'
        return super().unsupported()


# ------------------------------------------------------------------------------------------
# Responses (plain dicts: they are built on the hot path of every streamed token)


def new_id(prefix: str) -> str:
    return f'{prefix}-{uuid.uuid4().hex}'


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = 'invalid_request_error', code: Optional[str] = None,
               param: Optional[str] = None) -> Dict[str, Any]:
    """OpenAI's error envelope."""
    return {'error': {'message': message, 'type': type_, 'param': param, 'code': code}}


def model_card(name: str, root: str) -> Dict[str, Any]:
    return {'id': name, 'object': 'model', 'created': now(), 'owned_by': 'lmdeploy',
            'root': root, 'parent': None}
