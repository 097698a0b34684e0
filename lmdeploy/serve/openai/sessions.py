"""Prompts and interactive sessions (v0.0.6's `session_id` + `interactive_mode`).

A request without `session_id` runs each choice as a one-shot engine session. With one, the
engine keeps the conversation's KV cache between calls: the first turn is rendered in full and
starts the session, a later turn sends only its new messages in the template's later-turn form,
and a turn without `interactive_mode` ends the session when it is done.
"""
from __future__ import annotations

from typing import List, Optional

from . import protocol as P
from .engine_client import AsyncEngine
from .errors import bad_request
from .generation import Job


async def session_state(engine: AsyncEngine, req) -> Optional[dict]:
    """The engine's record of the request's session (None: a new session, or none at all)."""
    if req.session_id is None:
        if req.interactive_mode:
            raise bad_request('interactive_mode needs a session_id', param='session_id')
        return None
    if req.n != 1:
        raise bad_request('n must be 1 with a session_id', param='n')
    return await engine.session_info(req.session_id)


def render_chat(engine: AsyncEngine, messages: List[P.ChatMessage], first: bool) -> str:
    """The chat prompt: every message in full for a new conversation, else the new turns."""
    template = engine.template
    try:
        dicts = [{'role': m.role, 'content': m.text()} for m in messages]
    except ValueError as e:
        raise bad_request(str(e), param='messages') from None
    if first:
        try:
            return template.messages2prompt(dicts)
        except ValueError as e:
            raise bad_request(str(e), param='messages') from None
    parts = []
    for m in dicts:
        if m['role'] == 'system':
            raise bad_request('a system message is only allowed in the first turn of a '
                              'session', param='messages')
        if m['role'] == 'user':
            parts.append(template.get_prompt(m['content'], False))
        else:
            parts.append(m['content'] + template.assistant_end)
    return ''.join(parts)


def token_prompts(engine: AsyncEngine, prompt) -> List[List[int]]:
    """A completion's `prompt` (a text, token ids, or a list of either) as id lists."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(engine.tokenizer.encode(p))
        else:
            if any(not 0 <= t < engine.vocab_size for t in p):
                raise bad_request(f'token ids must be in [0, {engine.vocab_size})',
                                  param='prompt')
            out.append(list(p))
    return out


def make_jobs(engine: AsyncEngine, req, prompts: List[List[int]],
              info: Optional[dict]) -> List[Job]:
    """One job per (prompt, choice), with its session, length limit and seed."""
    history = len(info['tokens']) if info else 0
    limit = engine.session_len - 1
    jobs = []
    for p, ids in enumerate(prompts):
        if not ids:
            raise bad_request('the prompt is empty', 'empty_prompt', 'prompt')
        if history + len(ids) > limit:
            what = f'the session history ({history} tokens) plus the prompt' if history \
                else 'the prompt'
            raise bad_request(f'{what} ({len(ids)} tokens) does not fit the context of '
                              f'{engine.session_len} tokens (at most {limit} with room for one '
                              'generated token)', 'context_length_exceeded')
        max_tokens = req.max_tokens if req.max_tokens is not None \
            else engine.session_len - history - len(ids) - 1
        for i in range(req.n):
            if req.session_id is not None:
                sid, start, end = req.session_id, info is None, not req.interactive_mode
            else:
                sid, start, end = engine.oneshot_session(), True, True
            seed = None if req.seed is None else req.seed + i
            jobs.append(Job(p * req.n + i, sid, ids, max_tokens, start, end, seed))
    return jobs
