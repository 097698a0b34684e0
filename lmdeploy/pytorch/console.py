"""Terminal input shared by the chat loops: multi-line prompts ended by an empty line."""
from __future__ import annotations

import sys
from typing import Callable, Optional

PROMPT = '\ndouble enter to end input >>> '


def stdout_input(prompt: str = '') -> str:
    """`input()` with the prompt always on stdout (CPython writes it to stderr when stdin and
    stdout are a terminal and readline is not loaded)."""
    if prompt:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    return input()


def read_prompt(prompt: str = PROMPT, read_line: Callable[[str], str] = stdout_input) -> Optional[str]:
    """Read lines until an empty one and return them joined with '\\n'.

    The prompt text is shown before the first line only. Returns None at end of input (Ctrl-D or
    a closed stdin) when nothing was typed; text typed before the end of input is returned.
    """
    lines = []
    text = prompt
    while True:
        try:
            line = read_line(text)
        except EOFError:
            return '\n'.join(lines) if lines else None
        text = ''
        if line == '':
            return '\n'.join(lines)
        lines.append(line)
