"""TurboMind: the inference engine and its tokenizer."""
from .tokenizer import Tokenizer
from .turbomind import TurboMind, TurboMindInstance

__all__ = ['TurboMind', 'TurboMindInstance', 'Tokenizer']
