"""Single source of the package version."""

__version__ = '0.0.2'
version_info = tuple(int(x) for x in __version__.split('.'))
