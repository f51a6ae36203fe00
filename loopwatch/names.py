"""Names from the app (route templates, file paths, function names) made safe to show.

A route template is the app's own text: Starlette builds a route from any string, newlines,
terminal escapes and 5,000 characters included. Every view (labels, the ring, the log line,
OpenTelemetry, the page, ``report``) names the route the middleware booked, so it is made
safe once, where it is read (``routes``): control characters escaped, cut to ``MAX_NAME``
with a visible ``…``. Display layers cut further to their own width.
"""

from __future__ import annotations

__all__ = ["ELLIPSIS", "MAX_NAME", "clip"]

MAX_NAME = 200  # characters, marker included
ELLIPSIS = "\u2026"

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clip(text: str, limit: int = MAX_NAME, *, tail: bool = False) -> str:
    """``text`` on one line of at most ``limit`` characters: control and other unprintable
    characters escaped (``\\n``, ``\\x1b``), and a longer result cut with ``…`` at its end
    (``tail``: at its start, keeping the end, as for a file path)."""
    if len(text) <= limit and text.isprintable():
        return text  # the common case: one C-level scan, no copy
    # escape only what can be shown: a huge name costs no more than a short one
    window = text[-limit:] if tail else text[:limit]
    shown = window if window.isprintable() else "".join(map(_escape, window))
    if len(text) <= limit and len(shown) <= limit:
        return shown
    if tail:
        return ELLIPSIS + shown[len(shown) - limit + 1 :]
    return shown[: limit - 1] + ELLIPSIS
