"""LMDeploy: convert, serve and chat with LLMs on the TurboMind engine."""
from .version import __version__, version_info

__all__ = ['__version__', 'version_info']
