"""Terminal helpers shared by the chat CLIs (`lmdeploy.turbomind.chat`, `lmdeploy.turbomind.decode`,
`lmdeploy.pytorch.chat`); v0.0.2 behaviour reference, sections 0.1-0.2.

* `read_prompt()`: v0.0.2's "double enter" reader. It shows `\\ndouble enter to end input >>> `
  (always on stdout), reads lines until an empty one and returns them joined with `\\n`; None at
  end of input with nothing typed.
* `check_fire_args(fn, argv)`: fire silently ignores misspelt flags (it complains only after
  the function returned, and an interactive loop never returns). Call this before
  `fire.Fire(fn)` (`run_fire` does both) to turn an unknown flag, an extra positional argument
  or a missing required one into a one-line UsageError, before anything slow (an engine, a
  model) is loaded.
* `enable_line_editing()`: line editing and history for the prompt on a terminal.
* Errors: `CliError` (a one-line message and an exit status), `UsageError` (a bad command line,
  exit status 2), `one_line(e)` (an exception as one line) and `fail(message, code)` (print
  `error: message` on stderr and exit).

Only the standard library is imported here: the checks run before torch or an engine loads.
"""
from __future__ import annotations

import inspect
import logging
import re
import sys
from typing import Callable, List, NoReturn, Optional, Sequence

PROMPT = '\ndouble enter to end input >>> '

EXIT_ERROR = 1  # something failed (a model that does not load, an engine error)
EXIT_USAGE = 2  # a bad command line or option value
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


# ------------------------------------------------------------------------------------------
# One-line errors


class CliError(Exception):
    """An error for the user: a one-line message and the exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class UsageError(CliError, ValueError):
    """A bad command line or option value; the message is one line, the exit status 2."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


def one_line(e: BaseException, with_type: bool = False) -> str:
    """`e`'s message on one line (whitespace runs collapsed, a KeyError's quotes dropped).

    An empty message gives the exception's type name; `with_type` prefixes it always
    (`OSError: no such file`), for errors from libraries whose messages need the context.
    """
    text = ' '.join(str(e).split())
    if isinstance(e, KeyError) and len(text) > 1 and text[0] == text[-1] == "'":
        text = text[1:-1]
    name = type(e).__name__
    if not text:
        return name
    return f'{name}: {text}' if with_type else text


def log_to_stderr(logger: logging.Logger, level: int, fmt: str) -> logging.Logger:
    """`logger` at `level`, writing `fmt` lines to stderr (one handler, however often called;
    not propagated, so a host's root logger does not print them twice)."""
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with `code`."""
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


# ------------------------------------------------------------------------------------------
# Reading prompts


def enable_line_editing() -> bool:
    """Import `readline` when stdin is a terminal, so `input()` gets line editing (arrows,
    backspace over wide characters, history). Returns whether it is on."""
    if not sys.stdin.isatty():
        return False
    try:
        import readline  # noqa: F401
    except ImportError:
        return False
    return True


def stdout_input(prompt: str = '') -> str:
    """`input(prompt)` with the prompt always on stdout.

    CPython writes `input()`'s prompt to stderr when stdin and stdout are a terminal and
    readline is not loaded; then the prompt is written here instead. With readline loaded it
    goes to readline, which shows it on stdout and needs it to redraw the line while editing.
    """
    if prompt and 'readline' not in sys.modules:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        prompt = ''
    return input(prompt)


def read_prompt(prompt: str = PROMPT, read_line: Callable[[str], str] = stdout_input) -> Optional[str]:
    """Read lines until an empty line and return them joined with '\\n' (v0.0.2's reader).

    The prompt is shown once, before the first line: what comes up to its last newline is
    written to stdout here, its last line is passed to `read_line` (so that line editing knows
    it). End of input (Ctrl-D, a closed stdin) after some lines returns those lines; with
    nothing read it returns None. Ctrl-C raises KeyboardInterrupt as usual.
    """
    head, newline, tail = prompt.rpartition('\n')
    if newline:
        sys.stdout.write(head + newline)
        sys.stdout.flush()
    lines: List[str] = []
    text = tail
    while True:
        try:
            line = read_line(text)
        except EOFError:
            return '\n'.join(lines) if lines else None
        text = ''
        if line == '':
            return '\n'.join(lines)
        lines.append(line)


# ------------------------------------------------------------------------------------------
# Command-line checking for fire CLIs


def _is_flag(arg: str) -> bool:
    """fire's rule: '--x', '-x' and '-x...' are flags; '-1', '-0.5' (negative numbers) are not."""
    return arg.startswith('--') or re.match('^-[a-zA-Z]', arg) is not None


def check_fire_args(fn: Callable, argv: Optional[Sequence[str]] = None, usage: Optional[str] = None) -> None:
    """Raise UsageError (one line) where `fire.Fire(fn)` would not consume `argv` exactly.

    Follows fire's parsing: `--name value`, `--name=value`, dashes in names read as
    underscores, a bare `--flag` is True and `--noflag` False, a single-letter `-n` stands for
    the one parameter starting with that letter, positional arguments fill the parameters in
    order. A help request (`-h`, `--help`) and everything after a lone `--` (fire's own
    flags) are left to fire.

    A missing required argument reads `missing required argument NAME`, or with `usage` (the
    command's usage line) `missing NAME; usage: <usage>`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--' in argv:
        argv = argv[:argv.index('--')]
    if '-h' in argv or '--help' in argv:
        return
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in params]
    known = ', '.join(f'--{n}' for n in names)
    given = set()
    positionals = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not _is_flag(arg):
            positionals.append(arg)
            i += 1
            continue
        has_value = '=' in arg
        key = arg.lstrip('-').split('=', 1)[0].replace('-', '_')
        is_bool = not has_value and (i + 1 == len(argv) or _is_flag(argv[i + 1]))
        if key in names:
            name = key
        elif is_bool and key.startswith('no') and key[2:] in names:
            name = key[2:]
        elif len(key) == 1 and not arg.startswith('--'):
            matches = [n for n in names if n[0] == key]
            if len(matches) != 1:
                what = 'is ambiguous' if matches else 'is not a flag of this command'
                raise UsageError(f'{arg} {what}; use the long form (flags: {known})')
            name = matches[0]
        else:
            raise UsageError(f'unknown flag {arg.split("=", 1)[0]} (flags: {known})')
        if name in given:
            raise UsageError(f'--{name} is given twice')
        given.add(name)
        i += 1 if (has_value or is_bool) else 2
    free = [p for p in params if p.name not in given and p.kind != p.KEYWORD_ONLY]
    if len(positionals) > len(free):
        extra = ' '.join(positionals[len(free):])
        raise UsageError(f'unexpected argument(s): {extra}')
    for p in free[len(positionals):]:
        if p.default is inspect.Parameter.empty:
            if usage:
                raise UsageError(f'missing {p.name.upper()}; usage: {usage}')
            raise UsageError(f'missing required argument {p.name.upper()}')


def run_fire(fn: Callable, argv: Optional[Sequence[str]] = None, name: Optional[str] = None,
             usage: Optional[str] = None) -> None:
    """A fire CLI's entry point: `check_fire_args` (a bad command line is a one-line error with
    exit status 2, before anything loads), then `fire.Fire(fn)` on the same arguments; a
    `CliError` that `fn` raises becomes its one-line message and exit status."""
    try:
        check_fire_args(fn, argv, usage=usage)
        import fire
        fire.Fire(fn, command=None if argv is None else list(argv), name=name)
    except CliError as e:
        fail(str(e), e.code)
