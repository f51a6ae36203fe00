"""Test-time guard (work in progress): registers nothing yet."""

from __future__ import annotations
