"""loopwatch without a code change: ``loopwatch run`` puts its bootstrap ``sitecustomize`` on
``PYTHONPATH``, which calls ``install()`` in every Python process the command starts (server
workers too). ``install`` imports nothing heavy: it waits for a server's module to be imported
and wraps the app that server loads in ``LoopWatchMiddleware``, outermost, once.

Servers, by the place each loads its app:

- **uvicorn** (``uvicorn app:app``, ``--workers``, ``uvicorn.run(app)`` in a script, and
  gunicorn's ``uvicorn.workers.UvicornWorker``): ``uvicorn.config.Config.load``.

An app that already has the middleware (``add_middleware`` or an ASGI wrapper) is left as it
is. A failure here is logged once and the app is served as it was: loopwatch never stops it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["install", "installed", "watched"]

logger = logging.getLogger("loopwatch")

# the middleware's ASGI wrappers nest through ``.app``; Starlette keeps its list apart
_MAX_DEPTH = 32


def watched(app: object) -> bool:
    """Has ``app`` loopwatch's middleware already, as an ASGI wrapper or in Starlette's list?"""
    from loopwatch.middleware import LoopWatchMiddleware

    for _ in range(_MAX_DEPTH):
        if isinstance(app, LoopWatchMiddleware):
            return True
        for middleware in getattr(app, "user_middleware", None) or ():
            if getattr(middleware, "cls", None) is LoopWatchMiddleware:
                return True
        inner = getattr(app, "app", None)
        if inner is None or inner is app:
            return False
        app = inner
    return False


def _wrap(app: Any) -> Any:
    if watched(app):
        return app
    from loopwatch.middleware import LoopWatchMiddleware

    return LoopWatchMiddleware(app)


def _patch_uvicorn_config(module: ModuleType) -> None:
    config = module.Config
    original: Callable[[Any], None] = config.load
    if getattr(original, "__loopwatch__", False):
        return

    @functools.wraps(original)
    def load(self: Any) -> None:
        original(self)
        self.loaded_app = _wrap(self.loaded_app)

    load.__loopwatch__ = True  # type: ignore[attr-defined]
    config.load = load


# module name -> what to do once it has run
_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "uvicorn.config": _patch_uvicorn_config,
}


class _Loader(importlib.abc.Loader):
    """Runs the module's own loader, then its patch."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _apply(self._patch, module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module in ``_PATCHES`` it asks the other finders and
    hands back their spec with the patching loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, patch)
        return spec


def _apply(patch: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        patch(module)
    except Exception:  # the server runs as it would without loopwatch
        logger.exception("loopwatch: could not attach to %s; serving without it", module.__name__)


_finder: _Finder | None = None


def install() -> None:
    """Attach to every server in ``_PATCHES`` this process imports (already imported ones at
    once). Idempotent."""
    global _finder
    if _finder is not None:
        return
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            _apply(patch, module)


def installed() -> bool:
    return _finder is not None
