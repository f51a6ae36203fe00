"""The package's version, in a module of its own: any module can read it without importing
the package's ``__init__`` (and, through it, the whole package)."""

__version__ = "0.1.0"
