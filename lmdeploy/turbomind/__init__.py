"""TurboMind: the inference engine and its tokenizer.

`TurboMind` and `TurboMindInstance` load lazily, so importing the tokenizer (or a CLI's --help)
does not pull in torch and the compiled core.
"""

__all__ = ['TurboMind', 'TurboMindInstance', 'Tokenizer']


def __getattr__(name):
    if name in ('TurboMind', 'TurboMindInstance'):
        from . import turbomind
        return getattr(turbomind, name)
    if name == 'Tokenizer':
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
