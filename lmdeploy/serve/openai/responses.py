"""Response bodies: the whole completion, and the server-sent-event chunks of a streamed one."""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from . import protocol as P
from .generation import Choice, Job


def prompt_tokens(req, jobs: List[Job]) -> int:
    """Each prompt counted once, however many choices it has."""
    return sum(len(j.input_ids) for j in jobs[::req.n])


def full_response(req, jobs: List[Job], choices: Dict[int, Choice], kind: str,
                  model: str) -> dict:
    ordered = [choices[j.index] for j in jobs]
    if kind == 'chat':
        out = [{'index': c.index, 'message': {'role': 'assistant', 'content': c.text},
                'logprobs': None, 'finish_reason': c.finish_reason} for c in ordered]
        obj, prefix = 'chat.completion', 'chatcmpl'
    else:
        out = [{'index': c.index, 'text': c.text, 'logprobs': None,
                'finish_reason': c.finish_reason} for c in ordered]
        obj, prefix = 'text_completion', 'cmpl'
    body = {'id': P.new_id(prefix), 'object': obj, 'created': P.now(), 'model': model,
            'choices': out,
            'usage': P.usage(prompt_tokens(req, jobs), sum(c.n_tokens for c in ordered))}
    if req.session_id is not None:
        body['session_id'] = req.session_id
    return body


def sse(body: dict) -> bytes:
    return b'data: ' + json.dumps(body, ensure_ascii=False).encode() + b'\n\n'


SSE_DONE = b'data: [DONE]\n\n'


class Chunks:
    """The chunks of one streamed response (chat.completion.chunk or text_completion)."""

    def __init__(self, kind: str, model: str):
        self.kind = kind
        self.model = model
        self.id = P.new_id('chatcmpl' if kind == 'chat' else 'cmpl')
        self.created = P.now()
        self.object = 'chat.completion.chunk' if kind == 'chat' else 'text_completion'

    def _body(self, choices: list, **extra) -> dict:
        return {'id': self.id, 'object': self.object, 'created': self.created,
                'model': self.model, 'choices': choices, **extra}

    def role(self, index: int) -> bytes:
        """A chat stream's first chunk for a choice: the assistant role, no text yet."""
        return sse(self._body([{'index': index, 'delta': {'role': 'assistant', 'content': ''},
                                'logprobs': None, 'finish_reason': None}]))

    def text(self, index: int, text: str) -> bytes:
        if self.kind == 'chat':
            c = {'index': index, 'delta': {'content': text}, 'logprobs': None,
                 'finish_reason': None}
        else:
            c = {'index': index, 'text': text, 'logprobs': None, 'finish_reason': None}
        return sse(self._body([c]))

    def finish(self, index: int, reason: Optional[str]) -> bytes:
        if self.kind == 'chat':
            c = {'index': index, 'delta': {}, 'logprobs': None, 'finish_reason': reason}
        else:
            c = {'index': index, 'text': '', 'logprobs': None, 'finish_reason': reason}
        return sse(self._body([c]))

    def usage(self, prompt: int, completion: int) -> bytes:
        return sse(self._body([], usage=P.usage(prompt, completion)))
