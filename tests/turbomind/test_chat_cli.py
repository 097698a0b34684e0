"""`python -m lmdeploy.turbomind.chat` driven through a pseudo-terminal on the deployed MiniChat.

The workspace is deployed once for the module; every conversation is a real process (the engine
loads in ~2 s), greedy (`--top_k 1`), and the replies are checked against `answer_for`.
"""
import os
import subprocess
import sys

import pytest

pexpect = pytest.importorskip('pexpect')
pytest.importorskip('sentencepiece')

from tools.minichat_data import answer_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = 'double enter to end input >>> '
TIMEOUT = 60


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    from lmdeploy.serve.turbomind.deploy import deploy
    dst = tmp_path_factory.mktemp('chat') / 'workspace'
    deploy('minichat', os.path.join(ROOT, 'assets', 'minichat'), 'hf', dst_path=str(dst))
    return str(dst)


def spawn(ws, *args, greedy=True):
    env = dict(os.environ, TERM='dumb', PYTHONUNBUFFERED='1', PYTHONIOENCODING='utf-8')
    argv = ['-m', 'lmdeploy.turbomind.chat', ws, *(('--top_k', '1') if greedy else ()), *args]
    child = pexpect.spawn(sys.executable, argv, cwd=ROOT, env=env, encoding='utf-8',
                          timeout=TIMEOUT, dimensions=(40, 400))
    child.expect_exact(PROMPT)
    return child


def send(child, text):
    """Type `text` and the empty line that sends it."""
    for line in text.split('\n'):
        child.sendline(line)
    child.sendline('')


def ask(child, text, session_id=1):
    """Send one turn; return the output lines before the next prompt (reply, then any notes)."""
    send(child, text)
    child.expect_exact(f'session {session_id}\r\n')
    child.expect_exact(PROMPT)
    lines = child.before.replace('\r\n', '\n').rstrip('\n').split('\n')
    for line in lines:
        assert 'Traceback' not in line, child.before
        if not line.startswith('['):  # the reply (notes are in brackets)
            assert '\ufffd' not in line and '<|end|>' not in line, child.before
    return lines


def command(child, text):
    """Send a keyword (`end`); return the output before the next prompt."""
    send(child, text)
    child.expect_exact(PROMPT)
    return child.before


def finish(child, status=0):
    child.expect(pexpect.EOF)
    child.close()
    assert 'Traceback' not in (child.before or '')
    assert child.exitstatus == status, (child.exitstatus, child.signalstatus, child.before)


def run_cli(*args, module='lmdeploy.turbomind.chat'):
    return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- conversations

def test_english_conversation_with_follow_ups_then_exit(ws):
    child = spawn(ws)
    q1, q2, q3 = 'What is 12 + 5?', 'Add 3 to that.', 'Subtract 4 from that.'
    assert ask(child, q1) == [answer_for(q1)] == ['12 + 5 = 17.']
    assert ask(child, q2) == [answer_for(q2, 17)] == ['17 + 3 = 20.']
    assert ask(child, q3) == [answer_for(q3, 20)] == ['20 - 4 = 16.']
    send(child, 'exit')
    finish(child, 0)


def test_tensor_parallel_chat_gives_the_same_replies(ws):
    """--tp 2: two CPU ranks (gloo) answer exactly as one does."""
    child = spawn(ws, '--tp', '2')
    q1, q2 = 'What is 12 + 5?', 'Add 3 to that.'
    assert ask(child, q1) == [answer_for(q1)]
    assert ask(child, q2) == [answer_for(q2, 17)]
    assert ask(child, '你好') == [answer_for('你好')]
    send(child, 'exit')
    finish(child, 0)


def test_chinese_conversation_then_ctrl_d(ws):
    child = spawn(ws)
    for q in ('你好', '3 加 4 等于几？'):
        assert ask(child, q) == [answer_for(q)], q
    child.sendeof()
    finish(child, 0)


def test_multi_line_input_is_joined_with_newlines(ws):
    child = spawn(ws, '--verbose')
    out = ask(child, 'What is\n12 + 5?')
    assert out[0] == "[prompt '<BOS><|user|>What is\\n12 + 5?<|end|><|bot|>': 14 tokens after 0 " \
                     "in the session (session_len 1032)]"
    send(child, 'exit')
    finish(child, 0)


def test_end_ends_the_session_and_the_next_turn_starts_a_new_one(ws):
    child = spawn(ws, '--verbose')
    out = ask(child, 'What is 12 + 5?')
    assert out[0].startswith("[prompt '<BOS><|user|>What is 12 + 5?<|end|><|bot|>': 14 tokens after 0 ")
    assert out[1] == '12 + 5 = 17.'
    assert out[2] == '[12 tokens generated; the session holds 26 tokens]'
    out = ask(child, 'Add 3 to that.')
    assert out[0].startswith("[prompt '<|user|>Add 3 to that.<|end|><|bot|>': 10 tokens after 26 ")
    assert out[1] == '17 + 3 = 20.'
    # `end` generates nothing and frees the session; the next turn is a first turn again.
    assert 'session 1 ended' in command(child, 'end')
    out = ask(child, 'What is 40 - 8?')
    assert out[0].startswith("[prompt '<BOS><|user|>What is 40 - 8?<|end|><|bot|>': ")
    assert ' tokens after 0 in the session' in out[0]
    assert out[1] == answer_for('What is 40 - 8?')
    send(child, 'exit')
    finish(child, 0)


def test_ctrl_c_at_the_prompt_exits_cleanly(ws):
    child = spawn(ws)
    assert ask(child, 'Reverse the word guitar.') == [answer_for('Reverse the word guitar.')]
    child.sendintr()
    finish(child, 0)


def test_ctrl_c_while_generating_stops_the_reply_and_keeps_the_session(ws):
    # Sampling at temperature 30 over the whole vocabulary: seed 1 generates 512 tokens of noise.
    child = spawn(ws, '--top_k', '0', '--top_p', '1.0', '--temperature', '30', '--seed', '1',
                  '--verbose', greedy=False)
    send(child, 'Tell me a long story.')
    child.expect_exact('session 1\r\n')
    child.expect(r"': (\d+) tokens after 0 in the session \(session_len 1032\)\]\r\n")
    prompt_len = int(child.match.group(1))
    child.expect(r'\S{10}')  # the reply is streaming
    child.sendintr()
    child.expect(r'\[reply stopped by Ctrl-C after (\d+) tokens; the session is kept\]')
    n = int(child.match.group(1))
    assert 0 < n < 512
    child.expect_exact(PROMPT)
    assert 'Traceback' not in child.before
    # The session goes on from where the reply stopped: a later turn, with the whole history.
    send(child, 'Who are you?')
    child.expect(r"\[prompt '<\|user\|>Who are you\?<\|end\|><\|bot\|>': \d+ tokens after (\d+) ")
    assert int(child.match.group(1)) == prompt_len + n  # the first turn + the reply so far
    child.expect_exact(PROMPT)
    send(child, 'exit')
    finish(child, 0)


def test_too_long_input_is_refused_and_the_session_goes_on(ws):
    child = spawn(ws, '--session_len', '64')
    assert ask(child, 'What is 12 + 5?') == ['12 + 5 = 17.']  # 26 tokens in the session
    out = ask(child, ' '.join(['Add 3 to that.'] * 5))  # 26 + 38 tokens > 64
    assert len(out) == 1, out
    assert out[0].startswith('[the session is too long: history 26 + input 38 tokens exceed '
                             'session_len 64'), out
    assert 'type `end`' in out[0]
    # Nothing changed: the next turn still sees the first one.
    assert ask(child, 'Add 3 to that.') == ['17 + 3 = 20.']
    assert 'session 1 ended' in command(child, 'end')
    out = ask(child, ' '.join(['What is 12 + 5?'] * 8))  # a first turn longer than the session
    assert len(out) == 1 and out[0].startswith('[the input is too long for this model: '), out
    assert ask(child, 'What is 12 + 5?') == ['12 + 5 = 17.']
    send(child, 'exit')
    finish(child, 0)


def test_a_reply_cut_by_the_session_length_says_so(ws):
    child = spawn(ws, '--session_len', '32')
    out = ask(child, 'Count from 1 to 9.')  # 16-token prompt; the reply needs 28 tokens
    assert answer_for('Count from 1 to 9.').startswith(out[0])
    assert out[1] == '[the session is full (31 of session_len 32 tokens); type `end` to start a new one]'
    send(child, 'exit')
    finish(child, 0)


def test_reply_cut_by_request_output_len_says_so(ws):
    child = spawn(ws, '--request_output_len', '4')
    out = ask(child, 'What is 12 + 5?')
    assert out == ['12 +', '[reply cut at --request_output_len 4 tokens]']
    send(child, 'exit')
    finish(child, 0)


# ----------------------------------------------------------------------------- command line

def test_unknown_flag_is_an_error_before_the_engine_loads(ws):
    out = run_cli(ws, '--temperture', '0.5')
    assert out.returncode == 2 and out.stdout == ''
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith('error: unknown flag --temperture (flags: ')
    # checked before anything else: even the workspace is not looked at yet
    out = run_cli('/nonexistent/ws', '--bogus')
    assert out.returncode == 2 and 'unknown flag --bogus' in out.stderr


@pytest.mark.parametrize('args, message', [
    (('/nonexistent/ws',), 'error: workspace /nonexistent/ws does not exist'),
    ((ROOT,), f'error: {ROOT} is not a workspace (no triton_models/weights/config.ini)'),
    ((), 'error: missing required argument MODEL_PATH'),
])
def test_bad_workspace_is_a_one_line_error(args, message):
    out = run_cli(*args)
    assert out.returncode != 0 and out.stdout == ''
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr


@pytest.mark.parametrize('flags, message', [
    (dict(top_p=2), '--top_p must be in (0, 1], got 2'),
    (dict(session_id='abc'), "--session_id must be an integer >= 0, got 'abc'"),
    (dict(seed=-1), '--seed must be None or an integer in [0, 2**64), got -1'),
    (dict(temperature='hot'), "--temperature must be a number, got 'hot'"),
    (dict(request_output_len=0), '--request_output_len must be an integer >= 1, got 0'),
    (dict(log_level='LOUD'), '--log_level must be one of'),
])
def test_bad_values_are_one_line_errors(ws, capsys, flags, message):
    from lmdeploy.turbomind.chat import main
    with pytest.raises(SystemExit) as exc:
        main(ws, **flags)  # checked before anything is loaded
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {message}') and len(err.strip().splitlines()) == 1, err


def test_a_tp_that_does_not_split_the_model_is_a_one_line_error(ws):
    out = run_cli(ws, '--tp', '3')
    assert out.returncode == 1 and out.stdout == ''
    assert out.stderr.strip() == (f'error: cannot load {ws}: tp=3 does not divide head_num 8 '
                                  '(heads, KV heads, the FFN width and the vocabulary are split '
                                  'evenly)')


def test_help_explains_every_flag():
    out = run_cli('--help')
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr  # fire writes help to stderr when stdout is not a terminal
    for flag in ('session_id', 'repetition_penalty', 'tp', 'top_k', 'top_p', 'temperature',
                 'request_output_len', 'seed', 'session_len', 'log_level', 'verbose'):
        assert f'--{flag}=' in text, flag
    assert 'MODEL_PATH' in text and 'Ctrl-C' in text
