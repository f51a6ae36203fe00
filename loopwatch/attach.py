"""loopwatch without a code change: ``loopwatch run`` puts its bootstrap ``sitecustomize`` on
``PYTHONPATH`` in every Python process the command starts (server workers too). The bootstrap
imports nothing of loopwatch's until one of ``PATCHED_MODULES`` is imported; then it calls
``patch(module)``, which wraps the app that server loads in ``LoopWatchMiddleware``, outermost,
once.

Servers, by the place each loads its app:

- **uvicorn** (``uvicorn app:app``, ``--workers``, ``uvicorn.run(app)`` in a script, and
  gunicorn's ``uvicorn.workers.UvicornWorker``): ``uvicorn.config.Config.load``.
- **hypercorn** (its command, ``hypercorn.asyncio.serve`` in a script): ``hypercorn.utils.
  wrap_app``, which both use, for an ASGI app (a WSGI one is left as it is).
- **granian** (``--interface asgi`` or ``asginl``): ``granian.asgi``'s lifespan protocol and
  callback wrapper, each handed the same wrapped app (RSGI and WSGI apps are left as they are).
- **aiohttp** (not ASGI; ``web.run_app`` or an ``AppRunner``): ``loopwatch.aiohttp.setup``
  for the ``web.Application`` each ``AppRunner`` is made for.
- **a plain asyncio program** (``asyncio.run(main())``, ``uvloop.run``): ``loopwatch.watch()``
  as ``main`` starts, unless ``main`` is a server's own (its module is a server's or a
  framework's: the middleware watches that loop).

An app that already has the middleware (``add_middleware`` or an ASGI wrapper) is left as it
is. A failure here is logged once and the app is served as it was: loopwatch never stops it.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["PATCHED_MODULES", "patch", "watched"]

logger = logging.getLogger("loopwatch")


def watched(app: object) -> bool:
    """Has ``app`` loopwatch's middleware already, as an ASGI wrapper or in Starlette's list?"""
    from loopwatch.frameworks import wrapped_apps
    from loopwatch.middleware import LoopWatchMiddleware

    for inner in wrapped_apps(app):
        if isinstance(inner, LoopWatchMiddleware):
            return True
        for middleware in getattr(inner, "user_middleware", None) or ():
            if getattr(middleware, "cls", None) is LoopWatchMiddleware:
                return True
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


def _patch_hypercorn_utils(module: ModuleType) -> None:
    original: Callable[..., Any] = module.wrap_app
    if getattr(original, "__loopwatch__", False):
        return

    @functools.wraps(original)
    def wrap_app(app: Any, wsgi_max_body_size: int, mode: str | None) -> Any:
        if mode is None:
            mode = "asgi" if module.is_asgi(app) else "wsgi"
        if mode == "asgi":
            app = _wrap(app)
        return original(app, wsgi_max_body_size, mode)

    wrap_app.__loopwatch__ = True  # type: ignore[attr-defined]
    setattr(module, "wrap_app", wrap_app)  # noqa: B010 (a module, not a typed object)


# granian hands the app to its lifespan protocol and to its request wrapper apart: both must
# get the same middleware (the lifespan starts what the requests use). Apps live as long as
# the process, so they are kept by id with a reference.
_wrapped: dict[int, tuple[Any, Any]] = {}


def _wrap_once(app: Any) -> Any:
    known = _wrapped.get(id(app))
    if known is None or known[0] is not app:
        known = _wrapped[id(app)] = (app, _wrap(app))
    return known[1]


def _patch_granian_asgi(module: ModuleType) -> None:
    original: Callable[..., Any] = module._callback_wrapper
    if getattr(original, "__loopwatch__", False):
        return

    @functools.wraps(original)
    def callback_wrapper(callback: Any, *args: Any, **kwargs: Any) -> Any:
        return original(_wrap_once(callback), *args, **kwargs)

    callback_wrapper.__loopwatch__ = True  # type: ignore[attr-defined]
    setattr(module, "_callback_wrapper", callback_wrapper)  # noqa: B010
    lifespan = module.LifespanProtocol
    init: Callable[..., None] = lifespan.__init__

    @functools.wraps(init)
    def lifespan_init(self: Any, callable: Any, *args: Any, **kwargs: Any) -> None:
        init(self, _wrap_once(callable), *args, **kwargs)

    lifespan.__init__ = lifespan_init


def _patch_aiohttp_runner(module: ModuleType) -> None:
    runner = module.AppRunner
    init: Callable[..., None] = runner.__init__
    if getattr(init, "__loopwatch__", False):
        return

    @functools.wraps(init)
    def runner_init(self: Any, app: Any, *args: Any, **kwargs: Any) -> None:
        if not getattr(app, "frozen", True):  # a web.Application not serving yet
            from loopwatch.aiohttp import setup

            setup(app)
        init(self, app, *args, **kwargs)

    runner_init.__loopwatch__ = True  # type: ignore[attr-defined]
    runner.__init__ = runner_init


# a coroutine of these packages' own runs a server: the middleware attached above watches it
_SERVERS = ("uvicorn", "uvicorn_worker", "hypercorn", "granian", "aiohttp", "gunicorn", "daphne",
            "litestar", "quart", "django", "starlette", "fastapi")  # fmt: skip


def _servers_own(coro: Any) -> bool:
    frame = getattr(coro, "cr_frame", None)
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return isinstance(module, str) and module.split(".", 1)[0] in _SERVERS


async def _watched(coro: Any) -> Any:
    """``coro``, run with the loop watched (``loopwatch.watch()``) until it returns."""
    watching = None
    try:
        from loopwatch.watching import watch

        watching = watch()
    except Exception:  # the program runs as it would without loopwatch
        logger.exception("loopwatch: could not watch the program's loop; running without it")
    try:
        return await coro
    finally:
        if watching is not None:
            watching.stop()


def _patch_asyncio_runners(module: ModuleType) -> None:
    runner = getattr(module, "Runner", None)
    if runner is not None:  # 3.11+: asyncio.run and uvloop.run go through Runner.run
        original: Callable[..., Any] = runner.run
        if getattr(original, "__loopwatch__", False):
            return

        @functools.wraps(original)
        def run(self: Any, coro: Any, *args: Any, **kwargs: Any) -> Any:
            if not _servers_own(coro):
                coro = _watched(coro)
            return original(self, coro, *args, **kwargs)

        run.__loopwatch__ = True  # type: ignore[attr-defined]
        runner.run = run
        return
    plain: Callable[..., Any] = module.run  # 3.10
    if getattr(plain, "__loopwatch__", False):
        return

    @functools.wraps(plain)
    def run_watched(coro: Any, *args: Any, **kwargs: Any) -> Any:
        if not _servers_own(coro):
            coro = _watched(coro)
        return plain(coro, *args, **kwargs)

    run_watched.__loopwatch__ = True  # type: ignore[attr-defined]
    setattr(module, "run", run_watched)  # noqa: B010
    package = sys.modules.get("asyncio")
    if package is not None and getattr(package, "run", None) is plain:  # bound already
        setattr(package, "run", run_watched)  # noqa: B010


# module name -> what to do once it has run
_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "uvicorn.config": _patch_uvicorn_config,
    "hypercorn.utils": _patch_hypercorn_utils,
    "granian.asgi": _patch_granian_asgi,
    "aiohttp.web_runner": _patch_aiohttp_runner,
    "asyncio.runners": _patch_asyncio_runners,
}


# what the bootstrap watches for (``bootstrap/sitecustomize.py`` keeps the same names)
PATCHED_MODULES = tuple(_PATCHES)


def patch(module: ModuleType) -> None:
    """``module`` (one of ``PATCHED_MODULES``) has run: attach to it. A failure is logged and
    the program runs as it would without loopwatch."""
    fix = _PATCHES.get(module.__name__)
    if fix is None:
        return
    try:
        fix(module)
    except Exception:
        logger.exception("loopwatch: could not attach to %s; running without it", module.__name__)
