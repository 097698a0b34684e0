"""Console helpers shared by the terminal CLIs (v0.0.2 behaviour reference, sections 0.1-0.2).

* `read_prompt()`: v0.0.2's "double enter" reader. It prints `\\ndouble enter to end input >>> `,
  reads lines until an empty one and returns them joined with `\\n`.
* `check_fire_args(fn, argv)`: fire silently ignores misspelt flags (it complains only after
  the function returned, and an interactive loop never returns). Call this before
  `fire.Fire(fn)` to turn an unknown flag, an extra positional argument or a missing required
  one into a one-line error, before anything slow (an engine) is loaded.
* `enable_line_editing()`: line editing and history for `input()` on a terminal.
"""
from __future__ import annotations

import inspect
import re
import sys
from typing import Callable, List, Optional, Sequence

PROMPT = '\ndouble enter to end input >>> '


class UsageError(ValueError):
    """A bad command line; the message is one line."""


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


def read_prompt(prompt: str = PROMPT, input_fn: Callable[[str], str] = input) -> str:
    """Read lines until an empty line and return them joined with '\\n' (v0.0.2's reader).

    The prompt is shown once, before the first line. End of input (Ctrl-D, a closed pipe)
    after some lines returns those lines; with nothing read it raises EOFError. Ctrl-C raises
    KeyboardInterrupt as usual.
    """
    head, _, tail = prompt.rpartition('\n')
    if head or prompt.startswith('\n'):
        print(head + '\n', end='', flush=True)
    lines: List[str] = []
    first = True
    while True:
        try:
            line = input_fn(tail if first else '')
        except EOFError:
            if lines:
                return '\n'.join(lines)
            raise
        first = False
        if line == '':
            return '\n'.join(lines)
        lines.append(line)


# ------------------------------------------------------------------------------------------
# Command-line checking for fire CLIs


def _is_flag(arg: str) -> bool:
    """fire's rule: '--x', '-x' and '-x...' are flags; '-1', '-0.5' (negative numbers) are not."""
    return arg.startswith('--') or re.match('^-[a-zA-Z]', arg) is not None


def check_fire_args(fn: Callable, argv: Optional[Sequence[str]] = None) -> None:
    """Raise UsageError (one line) where `fire.Fire(fn)` would not consume `argv` exactly.

    Follows fire's parsing: `--name value`, `--name=value`, dashes in names read as
    underscores, a bare `--flag` is True and `--noflag` False, a single-letter `-n` stands for
    the one parameter starting with that letter, positional arguments fill the parameters in
    order. A help request (`-h`, `--help`) and everything after a lone `--` (fire's own
    flags) are left to fire.
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
            raise UsageError(f'missing required argument {p.name.upper()}')
