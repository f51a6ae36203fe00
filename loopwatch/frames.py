"""Frames: which code is the application's, and the culprit line of a stack."""

from __future__ import annotations

import dis
import functools
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable
from types import CodeType, FrameType

__all__ = [
    "CodeFilter",
    "FrameSource",
    "format_culprit",
    "format_stack",
    "last_call_line",
    "snapshot",
]


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.add(os.path.dirname(os.path.abspath(__file__)))  # loopwatch itself
    dirs.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


class CodeFilter:
    """Decides which frames are application code: not the standard library, not
    site-packages, not loopwatch. Results are cached per file name."""

    def __init__(self, library_dirs: tuple[str, ...] | None = None) -> None:
        # Resolved at first use, on the watchdog thread: the paths are realpath()ed, file
        # system calls a monitor built on the loop must not make there (blockbuster).
        self._dirs = library_dirs
        self._cache: dict[str, bool] = {}

    def is_app(self, filename: str) -> bool:
        known = self._cache.get(filename)
        if known is None:
            if filename.startswith("<"):  # <frozen ...>, <string>
                known = False
            else:
                if self._dirs is None:
                    self._dirs = _library_dirs()
                real = os.path.realpath(filename)
                known = not real.startswith(self._dirs)
            if len(self._cache) < 10_000:
                self._cache[filename] = known
        return known

    def culprit(
        self, frame: FrameType | None, after_call: bool = False
    ) -> tuple[str, int, str] | None:
        """(path, line, function) of the innermost application frame, else the innermost
        frame. ``after_call``: see ``snapshot``."""
        return self.pick(snapshot(frame, after_call))

    def pick(self, stack: list[traceback.FrameSummary]) -> tuple[str, int, str] | None:
        """``culprit`` of a ``snapshot``, innermost first."""
        for where in stack:
            if self.is_app(where.filename):
                return (where.filename, where.lineno or 0, where.name)
        if not stack:
            return None
        return (stack[0].filename, stack[0].lineno or 0, stack[0].name)


def snapshot(
    frame: FrameType | None, after_call: bool = False, limit: int = 60
) -> list[traceback.FrameSummary]:
    """Where each frame of a stack stands now, innermost first, as plain values: a frame
    object is live, and the thread it belongs to moves on as soon as this one lets the GIL go
    (reading a file does). ``after_call``: the stack was read right after a call that kept the
    GIL, so the innermost frame's line is that of its last call (``last_call_line``)."""
    stack: list[traceback.FrameSummary] = []
    top = frame
    while frame is not None and len(stack) < limit:
        code = frame.f_code
        line = last_call_line(frame) if after_call and frame is top else frame.f_lineno
        stack.append(
            traceback.FrameSummary(code.co_filename, line, code.co_name, lookup_line=False)
        )
        frame = frame.f_back
    return stack


def _calls(code: CodeType) -> tuple[tuple[int, int], ...]:
    """(offset, line) of each call instruction of ``code``."""
    calls = []
    line = 0
    for ins in dis.get_instructions(code):
        positions = getattr(ins, "positions", None)  # 3.11+; before, the line starts only
        if positions is not None and positions.lineno:
            line = positions.lineno
        elif ins.starts_line:
            line = ins.starts_line
        if ins.opname.startswith(("CALL", "PRECALL")):
            calls.append((ins.offset, line))
    return tuple(calls)


def last_call_line(frame: FrameType) -> int:
    """The line of the last call ``frame`` made at or before where it stands. Right after a C
    call that kept the GIL returns, the frame may already stand on the next line when another
    thread first gets to look: the call's line is the culprit."""
    lasti = frame.f_lasti
    line = 0
    try:
        for offset, call_line in _calls(frame.f_code):
            if offset > lasti:
                break
            line = call_line or line
    except Exception:  # an odd code object: keep the line it stands on
        return frame.f_lineno
    return line or frame.f_lineno


def format_culprit(where: tuple[str, int, str] | None) -> str:
    if where is None:
        return "<unknown>"
    path, line, function = where
    return f"{path}:{line} in {function}"


def format_stack(frame: FrameType | list[traceback.FrameSummary] | None, limit: int = 60) -> str:
    """A stack (a frame, or a ``snapshot``), formatted innermost last, with source lines."""
    if frame is None:
        return ""
    stack = frame if isinstance(frame, list) else snapshot(frame, limit=limit)
    return "".join(traceback.StackSummary.from_list(stack[::-1]).format())


FrameSource = Callable[[], dict[int, FrameType]]
