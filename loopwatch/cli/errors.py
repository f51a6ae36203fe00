"""The program name and the one error type every command raises for the user to act on."""

from __future__ import annotations

__all__ = ["PROG", "CliError"]

PROG = "loopwatch"


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""
