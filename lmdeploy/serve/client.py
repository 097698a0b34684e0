"""Terminal chat with a Triton service (behaviour reference 1.6):

    python -m lmdeploy.serve.client HOST:PORT [--session_id 1] [--request_output_len 512]

Type a prompt and press Enter on an empty line ("double enter"). `end` ends the session (the
next prompt starts a new conversation), `exit` ends it and quits; Ctrl-D at the prompt does
the same. Ctrl-C while a reply streams stops that reply (the session is kept); Ctrl-C at the
prompt quits. The model name, its chat template and BOS/EOS come from the server; the reply
streams through the incremental detokenizer. Errors (an unreachable server, a refused turn, a
full session) are one line. SERVICE_LOG_LEVEL sets the `service.ft` logger (WARNING).

Deliberate differences from v0.0.2: `exit` ends the server session (v0.0.2 left it behind), a
full session asks for `end` instead of failing every later turn silently, and an unreachable
server is a one-line error instead of a traceback.
"""
from __future__ import annotations

import os
import sys

from lmdeploy.console import (EXIT_ERROR, EXIT_INTERRUPTED, UsageError, enable_line_editing,
                              one_line, read_prompt, run_fire)


def check_addr(addr) -> str:
    if not isinstance(addr, str) or ':' not in addr or not addr.rsplit(':', 1)[1].isdigit():
        raise UsageError(f'TRITONSERVER_ADDR must be HOST:PORT (e.g. 127.0.0.1:33337), got {addr!r}')
    return addr


def connect(addr: str, log_level: str):
    """A Chatbot on `addr`, or a one-line CliError when the server cannot be used."""
    from lmdeploy.console import CliError
    from lmdeploy.serve.turbomind.chatbot import Chatbot
    try:
        return Chatbot(addr, log_level=log_level, display=True)
    except ValueError as e:
        raise CliError(one_line(e), EXIT_ERROR) from None
    except Exception as e:  # noqa: BLE001 - tritonclient's errors: unreachable, no model
        text = one_line(e)
        if 'failed to connect' in text.lower() or 'unavailable' in text.lower():
            text = f'cannot reach a Triton server at {addr} ({text})'
        else:
            text = f'the Triton server at {addr} cannot be used: {text}'
        raise CliError(text, EXIT_ERROR) from None


def chat_loop(chatbot, session_id: int, request_output_len: int, read=read_prompt) -> None:
    from lmdeploy.serve.turbomind.chatbot import StatusCode
    nth_round = 1
    while True:
        try:
            prompt = read()
        except KeyboardInterrupt:
            print()
            chatbot.end(session_id) if chatbot.session else None
            raise
        if prompt is None:  # end of input
            print()
            if chatbot.session:
                chatbot.end(session_id)
            return
        command = prompt.strip()
        if command == 'exit':
            if chatbot.session:
                chatbot.end(session_id)
            return
        if command == 'end':
            if chatbot.session:
                chatbot.end(session_id)
            print(f'session {session_id} ended')
            nth_round += 1
            continue
        if not command:
            continue
        request_id = f'{session_id}-{nth_round}'
        nth_round += 1
        gen = chatbot.stream_infer(session_id, prompt, request_id=request_id,
                                   request_output_len=request_output_len)
        try:
            for status, text, _ in gen:
                if status in (StatusCode.TRITON_SESSION_OUT_OF_LIMIT, StatusCode.TRITON_SERVER_ERR,
                              StatusCode.TRITON_SESSION_CLOSED,
                              StatusCode.TRITON_SESSION_INVALID_ARG):
                    print(f'[{text}]', flush=True)
        except KeyboardInterrupt:
            gen.close()  # cancels the request on the server; the session is kept
            print('\n[reply stopped by Ctrl-C; the session is kept]', flush=True)


def main(tritonserver_addr: str, session_id: int = 1, request_output_len: int = 512):
    """Chat with the model served at TRITONSERVER_ADDR (HOST:PORT, the gRPC endpoint).

    Args:
        tritonserver_addr: HOST:PORT of the Triton gRPC endpoint.
        session_id: the session id on the server.
        request_output_len: the longest reply, in tokens.
    """
    addr = check_addr(tritonserver_addr)
    if isinstance(session_id, bool) or not isinstance(session_id, int) or not 0 <= session_id < 2 ** 63:
        raise UsageError(f'--session_id must be an integer in [0, 2**63), got {session_id!r}')
    if isinstance(request_output_len, bool) or not isinstance(request_output_len, int) \
            or request_output_len < 1:
        raise UsageError(f'--request_output_len must be a positive integer, got {request_output_len!r}')
    chatbot = connect(addr, os.environ.get('SERVICE_LOG_LEVEL', 'WARNING'))
    enable_line_editing()
    try:
        chat_loop(chatbot, session_id, request_output_len)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


def cli(argv=None):
    run_fire(main, argv, name='lmdeploy.serve.client',
             usage='python -m lmdeploy.serve.client HOST:PORT [--session_id 1]')


if __name__ == '__main__':
    cli()
