"""The web UI (`python -m lmdeploy.app`) in real headless Chromium, against a real Triton server
on the deployed MiniChat (and once on the workspace path, engine in process)."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from tests.serve.triton_fixtures import (ROOT, deploy_minichat, free_port, require_serving,
                                         start_server)

require_serving()
pytest.importorskip('gradio')
playwright_api = pytest.importorskip('playwright.sync_api')

CHROMIUM = os.environ.get('CHROMIUM', '/usr/bin/chromium')
if not shutil.which(CHROMIUM):
    pytest.skip(f'no chromium at {CHROMIUM} (apt-get install chromium)', allow_module_level=True)
ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync']
TIMEOUT_MS = 30000


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    return deploy_minichat(tmp_path_factory, 'app')


@pytest.fixture(scope='module')
def server(ws):
    server = start_server(ws)
    yield server
    assert server.stop() == 0, server.output


class App:
    def __init__(self, target, port):
        self.url = f'http://127.0.0.1:{port}/'
        self.lines = []
        env = dict(os.environ, PYTHONUNBUFFERED='1', SERVICE_LOG_LEVEL='INFO')
        self.proc = subprocess.Popen([sys.executable, '-m', 'lmdeploy.app', target, '--server_port',
                                      str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f'the web UI did not start:\n{self.output}')

    @property
    def output(self):
        return ''.join(self.lines)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope='module')
def app(server):
    a = App(server.addr, free_port())
    yield a
    a.stop()


@pytest.fixture(scope='module')
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_context().new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector('#instruction textarea')
    return page


def chat_text(page) -> str:
    return page.locator('#chatbot').inner_text()


def say(page, text):
    box = page.locator('#instruction textarea')
    box.fill(text)
    box.press('Enter')


def wait_for_text(page, text, timeout_ms=60_000):
    # a MiniChat reply takes a few seconds on the CPU; a loaded 2-core CI machine took > 30 s
    page.wait_for_function('t => document.querySelector("#chatbot").innerText.includes(t)',
                           arg=text, timeout=timeout_ms)


def test_layout_title_model_and_controls(app, browser):
    page = open_page(browser, app.url)
    assert page.title() == 'LMDeploy Playground'
    assert 'LMDeploy Playground' in page.locator('body').inner_text()
    assert chat_text(page).strip().startswith('minichat')  # the chat pane is named after the model
    assert page.get_by_placeholder('Please input the instruction').count() == 1
    assert page.locator('#cancel').inner_text().strip() == 'Cancel'
    assert page.locator('#reset').inner_text().strip() == 'Reset'
    assert 'gradio.live' not in app.output  # no public link unless asked
    page.context.close()


def test_streamed_reply_appears_and_the_conversation_continues(app, browser):
    page = open_page(browser, app.url)
    say(page, 'What is 12 + 5?')
    wait_for_text(page, '12 + 5 = 17.')
    assert page.locator('#instruction textarea').input_value() == ''  # the box is cleared
    say(page, 'Add 3 to that.')
    wait_for_text(page, '17 + 3 = 20.')
    say(page, '你好')
    wait_for_text(page, '我是 MiniChat')
    page.context.close()


def test_reset_clears_the_chat_and_ends_the_server_session(app, browser):
    page = open_page(browser, app.url)
    say(page, 'What is 12 + 5?')
    wait_for_text(page, '12 + 5 = 17.')
    page.locator('#reset').click()
    page.wait_for_function('() => !document.querySelector("#chatbot").innerText.includes("17")')
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not re.search(r'session \d+ ended', app.output):
        time.sleep(0.1)
    assert re.search(r'session \d+ ended', app.output), app.output
    say(page, 'What is 40 - 8?')
    wait_for_text(page, '40 - 8 = 32.')
    page.context.close()


def test_two_browser_sessions_do_not_share_a_session(app, browser):
    mark = len(app.output)
    a = open_page(browser, app.url)
    b = open_page(browser, app.url)
    say(a, 'What is 12 + 5?')
    wait_for_text(a, '12 + 5 = 17.')
    say(b, 'What is 40 - 8?')
    wait_for_text(b, '40 - 8 = 32.')
    say(a, 'Add 3 to that.')
    wait_for_text(a, '17 + 3 = 20.')
    say(b, 'Add 3 to that.')
    wait_for_text(b, '32 + 3 = 35.')
    assert '32' not in chat_text(a) and '17' not in chat_text(b)
    ids = set(re.findall(r"session (\d+), request \1-\d+: prompt '<\|user\|>Add 3 to that\.", app.output[mark:]))
    assert len(ids) == 2, app.output
    a.context.close()
    b.context.close()


@pytest.mark.parametrize('lagging', [False, True], ids=['live', 'lagging'])
def test_cancel_stops_a_streaming_reply(server, browser, lagging):
    """The UI with a Chatbot that ignores EOS: uncancelled, the reply runs until the session is
    full (~1000 tokens, 10 s or more); Cancel cuts it short and the page stops changing.
    `lagging`: the UI reads the stream slower than the engine writes it (a slow browser or
    machine), so the engine has finished the whole reply when Cancel comes."""
    import logging
    from lmdeploy.app import build_ui
    from lmdeploy.serve.turbomind.chatbot import Chatbot
    bots = []

    class UIChatbot(Chatbot):
        read_at_cancel = None  # tokens of the session the UI had read when Cancel came

        def cancel(self, session_id):
            self.read_at_cancel = self.session.sequence_length
            return super().cancel(session_id)

    class LaggingChatbot(UIChatbot):
        def _request(self, session, inputs):
            responses = list(super()._request(session, inputs))  # the engine finishes first
            for response in responses:
                time.sleep(0.01)
                yield response

    def make_chatbot():
        cls = LaggingChatbot if lagging else UIChatbot
        bots.append(cls(server.addr, ignore_eos=True, log_level=logging.ERROR))
        return bots[-1]

    demo = build_ui('minichat', make_chatbot)
    demo.queue()
    port = free_port()
    demo.launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        page = open_page(browser, f'http://127.0.0.1:{port}/')
        say(page, 'What is 12 + 5?')
        # lagging: nothing shows before the engine has written the whole ~1000-token reply
        # (10-30 s on a loaded 2-core CI machine)
        wait_for_text(page, '12 + 5 = 17.', 120_000 if lagging else 30_000)
        bot = bots[0]
        page.locator('#cancel').click()
        # the page stops changing at once, even when the engine is done and the browser lags
        # behind the stream (the rest of the reply is never shown)
        deadline, stopped, since = time.monotonic() + 15, chat_text(page), time.monotonic()
        while time.monotonic() - since < 1.5 and time.monotonic() < deadline:
            time.sleep(0.1)
            if chat_text(page) != stopped:
                stopped, since = chat_text(page), time.monotonic()
        assert time.monotonic() - since >= 1.5, 'the reply kept streaming after Cancel'
        # Cancel reached the bot; the UI stopped reading right there, and the session goes on
        # from what was read. (gradio reads as fast as replies come while the page may show
        # them later: on a loaded machine a fast engine's whole reply can be read before the
        # click lands, and then there is nothing left to cut.)
        assert bot.read_at_cancel is not None, 'Cancel never reached the chatbot'
        assert bot.session.sequence_length <= bot.read_at_cancel + 2
        if lagging:  # slow by construction: far from the end at the click
            assert bot.session.sequence_length < bot.cfg.session_len - 100
        # the session is kept: the next message is answered in the same conversation
        say(page, 'Add 3 to that.')
        wait_for_text(page, 'Add 3 to that.')
        page.locator('#reset').click()
        page.wait_for_function('() => !document.querySelector("#chatbot").innerText.includes("12 + 5")')
        page.context.close()
    finally:
        demo.close()


def test_workspace_path_runs_the_engine_in_process(ws, browser):
    app = App(ws, free_port())
    try:
        assert 'web UI for minichat' in app.output
        page = open_page(browser, app.url)
        say(page, 'What is 12 + 5?')
        wait_for_text(page, '12 + 5 = 17.')
        say(page, 'Add 3 to that.')
        wait_for_text(page, '17 + 3 = 20.')
        page.context.close()
    finally:
        app.stop()


def test_unreachable_server_is_a_one_line_error():
    p = subprocess.run([sys.executable, '-m', 'lmdeploy.app', f'127.0.0.1:{free_port()}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith('error: cannot reach a Triton server')
    assert p.stderr.strip().count('\n') == 0, p.stderr
