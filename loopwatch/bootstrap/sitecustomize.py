"""loopwatch's bootstrap: ``loopwatch run`` puts this directory first on ``PYTHONPATH``, so
every Python process the command starts imports this module at start-up (``site``). It runs
the ``sitecustomize`` it hides, if there is one, then watches for the modules loopwatch attaches
to (``loopwatch.attach``). Only when one of them is imported does loopwatch itself load: a
Python process that imports none of them pays for this file alone.

Standard library only, nothing that ``python -c pass`` does not load already. Nothing here may
stop the program: a failure is printed once to stderr and the program runs.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # ``typing`` costs a bare interpreter's start-up several milliseconds
if TYPE_CHECKING:
    from typing import Any

# loopwatch.attach.PATCHED_MODULES (a test keeps the two the same)
WATCHED = frozenset(
    {"uvicorn.config", "hypercorn.utils", "granian.asgi", "aiohttp.web_runner", "asyncio.runners"}
)


def _attach(module: Any) -> None:
    try:
        from loopwatch.attach import patch
    except ImportError as error:
        print(f"loopwatch: not attached: {sys.executable} cannot import it ({error}); "
              "install loopwatch where COMMAND's Python finds it", file=sys.stderr)  # fmt: skip
        return
    try:
        patch(module)
    except Exception as error:
        print(f"loopwatch: not attached: {error!r}", file=sys.stderr)


class _Loader:
    """Runs the module's own loader, then attaches to the module."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _attach(module)


class _Finder:
    """Finds nothing itself: for a watched module it asks the other finders and hands back
    their spec with the attaching loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)  # type: ignore[assignment]  # (no importlib.abc: it loads typing)
        return spec


def _run_hidden_sitecustomize() -> None:
    """The ``sitecustomize`` further on the path (a venv's, a distribution's) runs as it would
    have without this one."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = sys.modules.pop(__name__, None)
    saved = sys.path[:]
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        __import__("sitecustomize")
    except ImportError as error:
        if error.name != "sitecustomize":
            raise
    finally:
        sys.path[:] = saved
        if ours is not None:
            sys.modules[__name__] = ours


def _install() -> None:
    try:
        _run_hidden_sitecustomize()
    except Exception as error:  # the hidden one failed: Python would print it and go on
        print(f"loopwatch: error in sitecustomize: {error!r}", file=sys.stderr)
    if any(isinstance(finder, _Finder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    for name in sorted(WATCHED):
        module = sys.modules.get(name)  # imported already (by the hidden sitecustomize)
        if module is not None:
            _attach(module)


_install()
