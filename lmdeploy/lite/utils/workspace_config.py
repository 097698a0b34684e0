"""Reading and editing the `config.ini` of a workspace's weight dir.

The section used is `[turbomind]` when present, else `[llama]` (the engine's rule). Edits are
made line by line, so comments, key order and every other line stay as they were; the new file
replaces the old one atomically (temporary file + rename, file mode kept).
"""
import configparser
import os
import os.path as osp
import re
import tempfile
from typing import Dict, Optional

from lmdeploy.console import EXIT_ERROR, CliError, one_line

_SECTION = re.compile(r'^\s*\[([^\]]+)\]\s*$')
_KEY = re.compile(r'^\s*([^=:\s#;][^=:]*?)\s*[=:]')


def read_config(ini: str) -> Optional[Dict[str, str]]:
    """The keys of `ini`'s engine section, or None when there is no such file."""
    if not osp.isfile(ini):
        return None
    parser = configparser.ConfigParser()
    try:
        with open(ini, encoding='utf-8') as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise CliError(f'cannot read {ini}: {one_line(e)}', EXIT_ERROR) from None
    section = config_section(parser)
    if section is None:
        raise CliError(f'{ini} has no [llama] (or [turbomind]) section', EXIT_ERROR)
    return dict(parser.items(section))


def config_section(parser: configparser.ConfigParser) -> Optional[str]:
    for name in ('turbomind', 'llama'):
        if parser.has_section(name):
            return name
    return None


def set_config_keys(ini: str, values: Dict[str, str]) -> None:
    """Set `key = value` in the engine section of `ini` (see the module docstring); keys not
    there yet are added at the end of the section."""
    with open(ini, encoding='utf-8', newline='') as f:
        lines = f.read().splitlines(keepends=True)
    parser = configparser.ConfigParser()
    parser.read_string(''.join(lines))
    section = config_section(parser)
    if section is None:
        raise CliError(f'{ini} has no [llama] (or [turbomind]) section', EXIT_ERROR)
    newline = '\r\n' if lines and lines[0].endswith('\r\n') else '\n'
    todo = {k.lower(): str(v) for k, v in values.items()}
    current, end = None, None  # the section a line is in; the index after its last key line
    for i, line in enumerate(lines):
        head = _SECTION.match(line)
        if head:
            current = head.group(1).strip()
            if current == section:
                end = i + 1
            continue
        if current != section:
            continue
        key = _KEY.match(line)
        if key is None:
            continue
        end = i + 1
        name = key.group(1).strip().lower()
        if name in todo:
            lines[i] = f'{key.group(1).strip()} = {todo.pop(name)}{newline}'
    if todo:
        if end and not lines[end - 1].endswith(('\n', '\r')):
            lines[end - 1] += newline
        lines[end:end] = [f'{k} = {v}{newline}' for k, v in todo.items()]
    _replace(ini, ''.join(lines))


def _replace(path: str, text: str) -> None:
    folder = osp.dirname(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.config.ini.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8', newline='') as f:
            f.write(text)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
