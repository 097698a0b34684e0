"""Web chat UI (gradio), behaviour reference 9.4 and Appendix A (v0.0.3):

    python -m lmdeploy.app HOST:PORT   [--server_name 127.0.0.1] [--server_port 6006] [--share]
    python -m lmdeploy.app ./workspace [--server_name 127.0.0.1] [--server_port 6006] [--share]

With HOST:PORT it chats through a Triton service's gRPC endpoint (`Chatbot`); with a workspace
path it runs the TurboMind engine in this process. The page: title "LMDeploy Playground", a chat
pane named after the model, an "Instruction" box (Enter sends), Cancel (stops the reply; the
session is kept) and Reset (ends the session on the engine and clears the chat).

v0.0.2's bugs fixed: every browser session gets its own engine session id (v0.0.2 used the
worker thread id, so two browsers could share one); Reset ends the server session (v0.0.2 leaked
it); no public gradio.live link unless `--share` is given; the UI listens on 127.0.0.1 unless
told otherwise.
"""
from __future__ import annotations

import os
import os.path as osp
import random
import threading
from typing import Optional

from lmdeploy.console import CliError, EXIT_ERROR, UsageError, one_line, run_fire

TITLE = 'LMDeploy Playground'
CSS = """
.contain { display: flex; flex-direction: column; }
#chatbot { flex-grow: 1; overflow: auto; }
"""

_session_ids = set()
_session_lock = threading.Lock()


def new_session_id() -> int:
    """An engine session id no other browser session of this process has (random, so that two
    apps on one server do not collide either)."""
    with _session_lock:
        while True:
            sid = random.SystemRandom().getrandbits(48) + 1
            if sid not in _session_ids:
                _session_ids.add(sid)
                return sid


class LocalChatbot:
    """`Chatbot`'s interface over an in-process TurboMind engine (one per browser session)."""

    def __init__(self, tm):
        from lmdeploy.serve.turbomind.chatbot import Session
        self.tm = tm
        self.instance = tm.create_instance()
        self.model_name = tm.model_name
        self.stop_ids = set(tm.stop_words or []) | {tm.eos_id}
        self._session: Optional[Session] = None
        self._seed = None

    @property
    def session(self):
        return self._session

    def stream_infer(self, session_id: int, prompt: str, request_id: str = '',
                     request_output_len: Optional[int] = None, sequence_start: bool = False,
                     sequence_end: bool = False):
        from lmdeploy.serve.turbomind.chatbot import Session, StatusCode
        from lmdeploy.turbomind.errors import EngineError, RequestError
        if self._session is None:
            self._session = Session(session_id=session_id)
            sequence_start = True
            self._seed = random.getrandbits(64)
        session = self._session
        template = self.tm.template
        text = template.get_prompt(prompt, sequence_start)
        input_ids = self.tm.tokenizer.encode(text)
        room = self.tm.session_len - session.sequence_length - len(input_ids)
        if room < 1:
            yield (StatusCode.TRITON_SESSION_OUT_OF_LIMIT,
                   f'session {session_id}: the session is full; `end` (Reset) it to start a new '
                   f'one', 0)
            return
        out_len = room if request_output_len is None else min(request_output_len, room)
        detok = self.tm.tokenizer.detokenizer()
        response, shown, ids, done = '', 0, [], False
        base = session.sequence_length
        try:
            for outputs in self.instance.stream_infer(
                    session_id, input_ids, request_output_len=out_len,
                    sequence_start=sequence_start, sequence_end=sequence_end,
                    step=session.sequence_length, top_k=template.top_k or 0, top_p=template.top_p,
                    temperature=template.temperature,
                    repetition_penalty=template.repetition_penalty,
                    random_seed=self._seed if sequence_start else None, stream_output=True):
                ids = outputs[0][0].tolist()
                visible = len(ids) - (1 if ids and ids[-1] in self.stop_ids else 0)
                if visible > shown:
                    response += detok.step(ids[shown:visible])
                    shown = visible
                # what the caller has seen so far: a caller that stops reading here (the UI's
                # Cancel) continues the session from it (the next turn's `step`)
                session.sequence_length = base + len(input_ids) + len(ids)
                yield StatusCode.TRITON_STREAM_ING, response, len(ids)
            response += detok.flush().replace('\ufffd', '')
            done = True
        except (RequestError, EngineError) as e:
            session.sequence_length = base
            yield StatusCode.TRITON_SERVER_ERR, one_line(e), 0
            return
        finally:
            if done or session.sequence_length > base:
                session.histories += text + response
        session.sequence_length = base + len(input_ids) + len(ids)
        yield StatusCode.TRITON_STREAM_END, response, len(ids)

    def cancel(self, session_id: int):
        from lmdeploy.serve.turbomind.chatbot import StatusCode
        from lmdeploy.turbomind.errors import RequestError
        try:
            self.instance.cancel(session_id)
        except RequestError:
            return StatusCode.TRITON_SERVER_ERR
        return StatusCode.TRITON_STREAM_END

    def end(self, session_id: int):
        from lmdeploy.serve.turbomind.chatbot import StatusCode
        self.instance.end(session_id)
        self._session = None
        return StatusCode.TRITON_STREAM_END


def _messages(history) -> list:
    """gradio's chat value as a list of {'role', 'content'} dicts."""
    out = []
    for item in history or []:
        if isinstance(item, dict):
            out.append({'role': item.get('role'), 'content': item.get('content')})
        else:
            out.append({'role': getattr(item, 'role', None), 'content': getattr(item, 'content', None)})
    return out


def build_ui(model_name: str, make_chatbot):
    """The Blocks app; `make_chatbot()` gives a fresh Chatbot-like object for a browser session."""
    import gradio as gr
    from lmdeploy.serve.turbomind.chatbot import StatusCode

    errors = (StatusCode.TRITON_SERVER_ERR, StatusCode.TRITON_SESSION_CLOSED,
              StatusCode.TRITON_SESSION_OUT_OF_LIMIT, StatusCode.TRITON_SESSION_INVALID_ARG)

    def ensure(state):
        if state is None:
            state = {'session_id': new_session_id(), 'bot': make_chatbot()}
        return state

    def chat_stream(instruction, history, state):
        state = ensure(state)
        history = _messages(history)
        if not instruction or not instruction.strip():
            yield history, state, ''
            return
        history += [{'role': 'user', 'content': instruction},
                    {'role': 'assistant', 'content': ''}]
        yield history, state, ''
        sid, bot = state['session_id'], state['bot']
        request_id = f'{sid}-{len(history) // 2}'
        bot.cancelled = False
        replies = bot.stream_infer(sid, instruction, request_id=request_id)
        try:
            for status, text, _ in replies:
                if getattr(bot, 'abandoned', False):  # Reset: this chat is gone, show nothing more
                    return
                if status in errors:
                    text = f'[{text}]'
                history[-1] = {'role': 'assistant', 'content': text}
                yield history, state, ''
                # Cancel: stop here even if the engine already generated more than the page has
                # shown (a slow browser lags behind); the session goes on from what was shown.
                if bot.cancelled:
                    return
        finally:
            replies.close()

    def cancel(state):
        if state is not None and state['bot'].session is not None:
            state['bot'].cancelled = True
            state['bot'].cancel(state['session_id'])
        return state

    def reset(state):
        if state is not None:
            state['bot'].abandoned = True
            if state['bot'].session is not None:
                state['bot'].end(state['session_id'])
            state = {'session_id': state['session_id'], 'bot': make_chatbot()}
        return [], state, ''

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f'## {TITLE}')
        chatbot = gr.Chatbot(label=model_name, elem_id='chatbot', height=500)
        instruction = gr.Textbox(label='Instruction', placeholder='Please input the instruction',
                                 elem_id='instruction')
        with gr.Row():
            cancel_btn = gr.Button('Cancel', elem_id='cancel')
            reset_btn = gr.Button('Reset', elem_id='reset')
        state = gr.State(None)
        send = instruction.submit(chat_stream, [instruction, chatbot, state],
                                  [chatbot, state, instruction], api_name=False)
        cancel_btn.click(cancel, [state], [state], queue=False, api_name=False)
        reset_btn.click(reset, [state], [chatbot, state, instruction], cancels=[send],
                        queue=False, api_name=False)
    return demo


def _is_addr(target: str) -> bool:
    if osp.exists(target):
        return False
    host, sep, port = target.rpartition(':')
    return bool(sep and host and port.isdigit())


def run(triton_server_addr: str, server_name: str = '127.0.0.1', server_port: int = 6006,
        share: bool = False, tp: int = 1):
    """Serve the chat UI for a Triton service (HOST:PORT) or a workspace path.

    Args:
        triton_server_addr: HOST:PORT of a Triton gRPC endpoint, or a workspace folder.
        server_name: address the web UI listens on.
        server_port: port of the web UI.
        share: also create a public gradio.live link (off by default).
        tp: tensor-parallel degree (workspace path only).
    """
    if not isinstance(triton_server_addr, str) or not triton_server_addr:
        raise UsageError(f'give HOST:PORT or a workspace path, got {triton_server_addr!r}')
    if isinstance(server_port, bool) or not isinstance(server_port, int) or not 0 < server_port < 65536:
        raise UsageError(f'--server_port must be a port number, got {server_port!r}')
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    from lmdeploy.serve.turbomind.utils import get_logger
    log_level = os.environ.get('SERVICE_LOG_LEVEL', 'INFO')
    get_logger(log_level=log_level)
    target = triton_server_addr
    if _is_addr(target):
        from lmdeploy.serve.client import connect
        probe = connect(target, log_level)  # one-line error when unreachable
        model_name = probe.model_name
        from lmdeploy.serve.turbomind.chatbot import Chatbot

        def make_chatbot():
            return Chatbot(target, log_level=log_level, display=False)
    else:
        from lmdeploy.turbomind.chat import check_workspace
        check_workspace(target)
        try:
            from lmdeploy.turbomind import TurboMind
            tm = TurboMind(target, tp=tp)
        except Exception as e:  # noqa: BLE001 - a workspace that does not load
            raise CliError(f'cannot load {target}: {one_line(e)}', EXIT_ERROR) from None
        model_name = tm.model_name

        def make_chatbot():
            return LocalChatbot(tm)

    import gradio as gr
    demo = build_ui(model_name, make_chatbot)
    demo.queue(max_size=100, default_concurrency_limit=4, api_open=False)
    theme = gr.themes.Soft(primary_hue=gr.themes.colors.blue, secondary_hue=gr.themes.colors.sky,
                           font=['Inconsolata', 'ui-monospace', 'monospace'])
    print(f'[lmdeploy] web UI for {model_name} on http://{server_name}:{server_port}', flush=True)
    demo.launch(server_name=server_name, server_port=server_port, share=bool(share),
                max_threads=10, theme=theme, css=CSS, quiet=True, footer_links=[])


def cli(argv=None):
    run_fire(run, argv, name='lmdeploy.app',
             usage='python -m lmdeploy.app HOST:PORT|WORKSPACE [--server_name 127.0.0.1] '
                   '[--server_port 6006]')


if __name__ == '__main__':
    cli()
