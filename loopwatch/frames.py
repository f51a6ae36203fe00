"""Frames: which code is the application's, and the culprit line of a stack."""

from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable
from types import FrameType

from loopwatch.names import clip

__all__ = ["CodeFilter", "FrameSource", "format_culprit", "format_stack"]


def _prefixes() -> tuple[str, ...]:
    return (sys.prefix, sys.base_prefix, sys.exec_prefix)


@functools.cache
def _library_dirs(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib", "scripts")
    dirs = {paths[k] for k in keys if k in paths}
    dirs.add(os.path.dirname(os.path.abspath(__file__)))  # loopwatch itself
    dirs.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    # the installers' console-script wrappers (``.venv/bin/pytest``, ``uvicorn``)
    dirs.update(os.path.join(p, sub) for p in prefixes if p for sub in ("bin", "Scripts"))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


_WRAPPER_MAX = 4096  # bytes: pip's, uv's and setuptools' wrappers are a few hundred


def is_console_script(path: str) -> bool:
    """Whether ``path`` is a console-script wrapper an installer wrote (pip, uv,
    setuptools): a short module that imports an entry point and exits with it, under
    ``if __name__ == "__main__"``, and defines nothing."""
    try:
        with open(path, "rb") as f:
            source = f.read(_WRAPPER_MAX + 1)
        if len(source) > _WRAPPER_MAX:
            return False
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return False
    nodes = list(ast.walk(tree))
    if any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for n in nodes):
        return False
    exits = any(
        isinstance(n, ast.Call) and ast.unparse(n.func) in ("sys.exit", "exit") for n in nodes
    )
    imports = any(isinstance(n, ast.ImportFrom | ast.Import) for n in nodes)
    main = any(isinstance(n, ast.Compare) and "__name__" in ast.unparse(n) for n in nodes)
    return exits and imports and main


class CodeFilter:
    """Decides which frames are application code: not the standard library, not
    site-packages, not loopwatch, not an installer's console-script wrapper (in the
    interpreter's ``bin``/``Scripts``, or ``sys.argv[0]`` when it is one: ``pytest``,
    ``uvicorn``). Results are cached per file name.

    ``prefixes`` (whose ``bin``/``Scripts`` hold wrappers) and ``main`` (the script this
    process runs) default to this interpreter's ``sys.prefix``/``base_prefix``/``exec_prefix``
    and ``sys.argv[0]``."""

    def __init__(
        self,
        library_dirs: tuple[str, ...] | None = None,
        *,
        prefixes: tuple[str, ...] | None = None,
        main: str | None = None,
    ) -> None:
        # Resolved at first use, on the watchdog thread: the paths are realpath()ed and the
        # main script read, file system calls a monitor built on the loop must not make
        # there (blockbuster).
        self._dirs = library_dirs
        self._prefixes = prefixes
        self._main = main
        self._resolved = False
        self._wrapper: str | None = None  # the main script's real path, if it is a wrapper
        self._cache: dict[str, bool] = {}

    def _resolve(self) -> None:
        self._resolved = True
        main = self._main
        if main is None:
            main = sys.argv[0] if sys.argv and sys.argv[0] else ""
        if main and is_console_script(main):
            self._wrapper = os.path.realpath(main)
        if self._dirs is None:
            prefixes = self._prefixes if self._prefixes is not None else _prefixes()
            self._dirs = _library_dirs(prefixes)

    def is_app(self, filename: str) -> bool:
        known = self._cache.get(filename)
        if known is None:
            if filename.startswith("<"):  # <frozen ...>, <string>
                known = False
            else:
                if not self._resolved:
                    self._resolve()
                real = os.path.realpath(filename)
                known = not real.startswith(self._dirs or ()) and real != self._wrapper
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


# a culprit's parts, as printed (``names.clip``): the end of a long path names its file
MAX_PATH = 200
MAX_FUNCTION = 100
MAX_SOURCE = 200


def format_culprit(where: tuple[str, int, str] | None) -> str:
    """ "path:line in function", on one line and bounded whatever the names."""
    if where is None:
        return "<unknown>"
    path, line, function = where
    return f"{clip(path, MAX_PATH, tail=True)}:{line} in {clip(function, MAX_FUNCTION)}"


def format_stack(frame: FrameType | None, limit: int = 60) -> str:
    """The frames innermost last, as ``traceback`` formats them, each name and source line
    escaped and cut like the culprit's, so every frame stays two lines."""
    if frame is None:
        return ""
    out = []
    for entry in traceback.extract_stack(frame, limit=limit):
        path, function = clip(entry.filename, MAX_PATH, tail=True), clip(entry.name, MAX_FUNCTION)
        out.append(f'  File "{path}", line {entry.lineno}, in {function}\n')
        if entry.line:
            out.append(f"    {clip(entry.line.strip(), MAX_SOURCE)}\n")
    return "".join(out)


FrameSource = Callable[[], dict[int, FrameType]]
