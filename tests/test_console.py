"""Unit tests of `lmdeploy.console`, the terminal helpers of every chat CLI: the "double enter"
prompt reader (prompt on stdout, end of input), the fire command-line check and its one-line
errors."""
import io
import subprocess
import sys

import pytest

from lmdeploy import console
from lmdeploy.console import (PROMPT, CliError, UsageError, check_fire_args, fail, one_line, read_prompt,
                              stdout_input)


def fake_input(items, prompts=None):
    """A `read_line` that returns `items` one by one (recording its prompts), then EOFError."""
    it = iter(items)

    def read(prompt):
        if prompts is not None:
            prompts.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


# -- read_prompt ---------------------------------------------------------------------------

def test_read_prompt_reads_until_an_empty_line(capsys):
    prompts = []
    assert read_prompt(read_line=fake_input(['first', 'second', '', 'next'], prompts)) == 'first\nsecond'
    # The prompt's leading newline is written here; its last line goes to read_line, once.
    assert capsys.readouterr().out == '\n'
    assert PROMPT == '\ndouble enter to end input >>> '
    assert prompts == ['double enter to end input >>> ', '', '']


def test_read_prompt_empty_line_first_is_an_empty_text():
    assert read_prompt(read_line=fake_input([''])) == ''


def test_read_prompt_keeps_inner_whitespace():
    assert read_prompt(read_line=fake_input(['  a ', '\tb', ''])) == '  a \n\tb'


def test_read_prompt_end_of_input(capsys):
    # Nothing typed: None.
    assert read_prompt(read_line=fake_input([])) is None
    # Lines typed, then end of input (Ctrl-D, closed pipe): those lines.
    assert read_prompt(read_line=fake_input(['last line'])) == 'last line'
    assert read_prompt(read_line=fake_input(['a', 'b'])) == 'a\nb'


def test_read_prompt_ctrl_c_propagates():
    def interrupt(prompt):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        read_prompt(read_line=interrupt)


def test_read_prompt_without_newline_in_prompt(capsys):
    prompts = []
    assert read_prompt('>>> ', read_line=fake_input(['x', ''], prompts)) == 'x'
    assert capsys.readouterr().out == ''
    assert prompts == ['>>> ', '']


def test_stdout_input_writes_the_prompt_to_stdout(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, 'readline', raising=False)
    monkeypatch.setattr(sys, 'stdin', io.StringIO('typed\n'))
    assert stdout_input('>>> ') == 'typed'
    out, err = capsys.readouterr()
    assert out == '>>> ' and err == ''
    monkeypatch.setattr(sys, 'stdin', io.StringIO(''))
    with pytest.raises(EOFError):
        stdout_input('>>> ')


def test_prompt_is_on_stdout_on_a_terminal(tmp_path):
    """On a real terminal without readline, CPython's input() would write the prompt to stderr."""
    pexpect = pytest.importorskip('pexpect')
    code = ('import sys; from lmdeploy.console import read_prompt; '
            'text = read_prompt(); print(repr(text))')
    err = tmp_path / 'stderr.txt'
    child = pexpect.spawn('/bin/bash', ['-c', f'exec {sys.executable} -c "{code}" 2>{err}'],
                          encoding='utf-8', timeout=30, echo=False)
    child.expect_exact('double enter to end input >>> ')
    child.sendline('hi')
    child.sendline('')
    child.expect_exact("'hi'")
    child.expect(pexpect.EOF)
    child.close()
    assert err.read_text() == ''


# -- errors --------------------------------------------------------------------------------

def test_usage_error_is_a_cli_error_with_exit_status_2():
    e = UsageError('bad flag')
    assert isinstance(e, CliError) and isinstance(e, ValueError)
    assert e.code == console.EXIT_USAGE == 2 and str(e) == 'bad flag'
    assert CliError('x').code == 2 and CliError('x', code=1).code == 1


def test_one_line():
    assert one_line(ValueError('a\n  b\tc ')) == 'a b c'
    assert one_line(KeyError('missing')) == 'missing'
    assert one_line(RuntimeError()) == 'RuntimeError'
    assert one_line(OSError('no such\nfile'), with_type=True) == 'OSError: no such file'
    assert one_line(RuntimeError(), with_type=True) == 'RuntimeError'


def test_fail_prints_one_line_and_exits(capsys):
    with pytest.raises(SystemExit) as info:
        fail('it broke', 3)
    assert info.value.code == 3
    out, err = capsys.readouterr()
    assert out == '' and err == 'error: it broke\n'


# -- check_fire_args -----------------------------------------------------------------------

def _main(model_path, session_id: int = 1, top_k: int = 40, verbose: bool = False):
    pass


@pytest.mark.parametrize('argv', [
    ['ws'], ['ws', '2'], ['ws', '--session_id', '3'], ['ws', '--session-id=3'],
    ['--model_path', 'ws'], ['ws', '--verbose'], ['ws', '--noverbose'],
    ['ws', '--verbose', '--top_k', '1'], ['ws', '--top_k', '-1'], ['ws', '-v'],
    ['--help'], ['-h'], ['ws', '--', '--help'], ['ws', '--', '--bogus'], ['--bogus', '--help'],
])
def test_check_fire_args_accepts(argv):
    check_fire_args(_main, argv)


@pytest.mark.parametrize('argv, message', [
    (['ws', '--temperture', '1'], 'unknown flag --temperture (flags: --model_path, --session_id, '),
    (['ws', '--top-p=1'], 'unknown flag --top-p'),
    (['ws', '1', '2', 'False', 'x'], 'unexpected argument(s): x'),
    ([], 'missing required argument MODEL_PATH'),
    (['--session_id', '2'], 'missing required argument MODEL_PATH'),
    (['ws', '-x'], '-x is not a flag'),
    (['ws', '--top_k', '1', '--top_k', '2'], '--top_k is given twice'),
    (['ws', '--noverbose', 'x'], 'unknown flag --noverbose'),  # --noX takes no value
])
def test_check_fire_args_rejects(argv, message):
    with pytest.raises(UsageError) as info:
        check_fire_args(_main, argv)
    assert str(info.value).startswith(message)
    assert '\n' not in str(info.value)


def test_check_fire_args_ambiguous_short_flag():
    def main(model_path, top_k: int = 1, top_p: float = 1.0):
        pass

    with pytest.raises(UsageError, match='^-t is ambiguous'):
        check_fire_args(main, ['ws', '-t', '1'])


def test_check_fire_args_usage_line():
    with pytest.raises(UsageError) as info:
        check_fire_args(_main, ['--top_k', '1'], usage='prog MODEL_PATH [--flags]')
    assert str(info.value) == 'missing MODEL_PATH; usage: prog MODEL_PATH [--flags]'


def test_check_fire_args_reads_sys_argv(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['prog', 'ws', '--bogus'])
    with pytest.raises(UsageError, match='^unknown flag --bogus'):
        check_fire_args(_main)


def test_run_fire_bad_command_line_exits_2_before_running(capsys):
    called = []

    def main(model_path):
        called.append(model_path)

    with pytest.raises(SystemExit) as info:
        console.run_fire(main, ['ws', '--bogus'], name='prog')
    assert info.value.code == 2 and not called
    assert capsys.readouterr().err == 'error: unknown flag --bogus (flags: --model_path)\n'


def test_run_fire_runs_the_function():
    pytest.importorskip('fire')
    called = []

    def main(model_path, n: int = 1):
        called.append((model_path, n))

    console.run_fire(main, ['ws', '--n', '3'], name='prog')
    assert called == [('ws', 3)]


def test_console_imports_only_the_standard_library():
    code = ('import sys; import lmdeploy.console; '
            'print(sorted(m for m in ("torch", "fire", "transformers", "readline") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'
