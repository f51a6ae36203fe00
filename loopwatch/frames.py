"""Frames: which code is the application's, and the culprit line of a stack."""

from __future__ import annotations

import ast
import dis
import functools
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable
from types import CodeType, FrameType

from loopwatch.names import clip

__all__ = [
    "CodeFilter",
    "FrameSource",
    "format_culprit",
    "format_stack",
    "last_call_line",
    "line_at",
    "snapshot",
]


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


@functools.lru_cache(maxsize=256)
def _calls(code: CodeType) -> tuple[tuple[int, int], ...]:
    """(offset, line) of each call instruction of ``code``: disassembled once per code (a
    check after a call that kept the GIL reads it, and the same calls recur)."""
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


def line_at(code: CodeType, offset: int) -> int:
    """The source line of the instruction at byte ``offset`` (a frame's ``f_lasti``), else
    the function's first line (not started yet, or an instruction with no line)."""
    if offset >= 0:
        for start, end, line in code.co_lines():
            if start <= offset < end:
                return line if line is not None else code.co_firstlineno
    return code.co_firstlineno


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


def format_stack(frame: FrameType | list[traceback.FrameSummary] | None, limit: int = 60) -> str:
    """A stack (a frame, or a ``snapshot``), innermost last, as ``traceback`` formats it,
    each name and source line escaped and cut like the culprit's (two lines a frame)."""
    if frame is None:
        return ""
    stack = frame if isinstance(frame, list) else snapshot(frame, limit=limit)
    out = []
    for entry in reversed(stack):
        path, function = clip(entry.filename, MAX_PATH, tail=True), clip(entry.name, MAX_FUNCTION)
        out.append(f'  File "{path}", line {entry.lineno}, in {function}\n')
        if entry.line:
            out.append(f"    {clip(entry.line.strip(), MAX_SOURCE)}\n")
    return "".join(out)


FrameSource = Callable[[], dict[int, FrameType]]
