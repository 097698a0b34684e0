"""`python -m lmdeploy.serve.client HOST:PORT` through a pseudo-terminal against a real server."""
import os
import subprocess
import sys

import pytest

from tests.serve.triton_fixtures import (ROOT, deploy_minichat, free_port, require_serving,
                                         start_server)

require_serving()
pexpect = pytest.importorskip('pexpect')

from tools.minichat_data import answer_for  # noqa: E402

PROMPT = 'double enter to end input >>> '
TIMEOUT = 60


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    server = start_server(deploy_minichat(tmp_path_factory, 'client'))
    yield server
    assert server.stop() == 0, server.output


def spawn(addr, *args):
    env = dict(os.environ, TERM='dumb', PYTHONUNBUFFERED='1', PYTHONIOENCODING='utf-8')
    child = pexpect.spawn(sys.executable, ['-m', 'lmdeploy.serve.client', addr, *args], cwd=ROOT,
                          env=env, encoding='utf-8', timeout=TIMEOUT, dimensions=(40, 400))
    child.expect_exact(PROMPT)
    return child


def send(child, text):
    for line in text.split('\n'):
        child.sendline(line)
    child.sendline('')


def ask(child, text):
    """The reply lines printed before the next prompt."""
    send(child, text)
    child.expect_exact(PROMPT)
    out = child.before.replace('\r\n', '\n')
    # the typed lines are echoed by the terminal; the reply follows them
    lines = [line for line in out.split('\n') if line.strip()]
    echoed = text.split('\n')
    assert lines[:len(echoed)] == echoed, lines
    assert 'Traceback' not in out
    return lines[len(echoed):]


def finish(child, status=0):
    child.expect(pexpect.EOF)
    child.close()
    assert 'Traceback' not in (child.before or '')
    assert child.exitstatus == status, (child.exitstatus, child.before)


def test_english_conversation_end_and_exit(server):
    child = spawn(server.addr, '--session_id', '3')
    assert ask(child, 'What is 12 + 5?') == ['12 + 5 = 17.']
    assert ask(child, 'Add 3 to that.') == [answer_for('Add 3 to that.', 17)]
    assert ask(child, 'end') == ['session 3 ended']
    # a new conversation: no history to follow up on
    assert ask(child, 'What is 40 - 8?') == ['40 - 8 = 32.']
    send(child, 'exit')
    finish(child, 0)


def test_chinese_conversation_then_ctrl_d(server):
    child = spawn(server.addr)
    for q in ('你好', '3 加 4 等于几？'):
        assert ask(child, q) == [answer_for(q)], q
    child.sendeof()
    finish(child, 0)


def test_unreachable_server_is_a_one_line_error():
    p = subprocess.run([sys.executable, '-m', 'lmdeploy.serve.client', f'127.0.0.1:{free_port()}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 1
    assert p.stderr.startswith('error: cannot reach a Triton server at 127.0.0.1:')
    assert p.stderr.strip().count('\n') == 0, p.stderr


@pytest.mark.parametrize('args', [['localhost'], ['127.0.0.1:1', '--sesion_id', '2'], []])
def test_bad_command_lines_are_usage_errors(args):
    p = subprocess.run([sys.executable, '-m', 'lmdeploy.serve.client', *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith('error: ') and p.stderr.strip().count('\n') == 0, p.stderr
