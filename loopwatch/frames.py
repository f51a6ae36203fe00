"""Frames: which code is the application's, and the culprit line of a stack."""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable
from types import FrameType

__all__ = ["CodeFilter", "FrameSource", "format_culprit", "format_stack"]


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

    def culprit(self, frame: FrameType | None) -> tuple[str, int, str] | None:
        """(path, line, function) of the innermost application frame, else the innermost frame."""
        innermost = None
        while frame is not None:
            code = frame.f_code
            if innermost is None:
                innermost = (code.co_filename, frame.f_lineno, code.co_name)
            if self.is_app(code.co_filename):
                return (code.co_filename, frame.f_lineno, code.co_name)
            frame = frame.f_back
        return innermost


def format_culprit(where: tuple[str, int, str] | None) -> str:
    if where is None:
        return "<unknown>"
    path, line, function = where
    return f"{path}:{line} in {function}"


def format_stack(frame: FrameType | None, limit: int = 60) -> str:
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame, limit=limit))


FrameSource = Callable[[], dict[int, FrameType]]
