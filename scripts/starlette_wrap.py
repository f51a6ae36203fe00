"""pytest plugin for ``scripts/starlette_suite.py``: runs Starlette's own tests with every app
they serve wrapped in ``LoopWatchMiddleware``.

Loaded into both runs with ``-p starlette_wrap`` (``scripts/`` on ``PYTHONPATH``) so that the
two JUnit reports carry the same properties; only ``--loopwatch-wrap`` wraps. Per test it
records in the JUnit XML:

- ``nodeid``: the exact pytest node id, to match the two runs test by test;
- ``backend``: the ``anyio_backend`` the test runs on: ``asyncio``, ``trio``, or ``none`` for
  a test that takes no ``anyio_backend`` (a bare ``TestClient(app)`` runs on asyncio);
- ``blockbuster``: whether Starlette's blockbuster guard was active while the test ran;
- ``apps_wrapped``: how many apps were wrapped from its setup to the end of its call (0 in the
  bare run), so a patch that stops taking cannot make the comparison vacuously green.

Wrapping happens where an app enters a client: ``starlette.testclient.TestClient`` (so
lifespan, HTTP and websocket sessions all go through the middleware) and
``httpx.ASGITransport`` / ``httpx2.ASGITransport``. Each app gets a fresh
``CollectorRegistry``, as loopwatch's own tests do.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

import pytest

_WRAPPED = "_loopwatch_suite_wrapped"
_apps_wrapped = 0  # apps wrapped so far in this session


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--loopwatch-wrap",
        action="store_true",
        default=False,
        help="wrap every app given to TestClient / ASGITransport in LoopWatchMiddleware",
    )


def _wrap(app: Any) -> Any:
    global _apps_wrapped
    from prometheus_client import CollectorRegistry

    from loopwatch import LoopWatchMiddleware

    if isinstance(app, LoopWatchMiddleware):
        return app
    _apps_wrapped += 1
    return LoopWatchMiddleware(app, registry=CollectorRegistry())


def _patch_init(cls: type, convert: Callable[[Any], Any] | None = None) -> None:
    """Replace ``cls.__init__`` by one that wraps its ``app`` argument (first positional
    or keyword), after ``convert`` (ASGI2 -> ASGI3) so the wrapper sees an ASGI3 app."""
    original: Callable[..., None] = cls.__init__  # type: ignore[misc]
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            app = convert(args[0]) if convert else args[0]
            args = (_wrap(app), *args[1:])
        elif "app" in kwargs:
            app = convert(kwargs["app"]) if convert else kwargs["app"]
            kwargs["app"] = _wrap(app)
        original(self, *args, **kwargs)

    setattr(__init__, _WRAPPED, True)
    cls.__init__ = __init__  # type: ignore[misc]


def _install_wrappers() -> list[str]:
    patched: list[str] = []
    from starlette import testclient

    is_asgi3: Callable[[Any], bool] | None = getattr(testclient, "_is_asgi3", None)
    wrap_asgi2: Callable[[Any], Any] | None = getattr(testclient, "_WrapASGI2", None)

    def to_asgi3(app: Any) -> Any:
        # TestClient decides ASGI2 vs 3 by the app's signature; our wrapper is ASGI3, so an
        # ASGI2 app is converted first, exactly as TestClient would have.
        if is_asgi3 is not None and wrap_asgi2 is not None and not is_asgi3(app):
            return wrap_asgi2(app)
        return app

    _patch_init(testclient.TestClient, to_asgi3)
    patched.append("starlette.testclient.TestClient")
    for name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        transport = getattr(module, "ASGITransport", None)
        if isinstance(transport, type):
            _patch_init(transport)
            patched.append(f"{name}.ASGITransport")
    return patched


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("loopwatch_wrap"):
        config.stash[_patched_key] = _install_wrappers()


_patched_key = pytest.StashKey[list[str]]()


def pytest_report_header(config: pytest.Config) -> str:
    patched = config.stash.get(_patched_key, None)
    if patched is None:
        return "starlette_wrap: bare run (apps not wrapped)"
    return f"starlette_wrap: LoopWatchMiddleware around apps given to {', '.join(patched)}"


def _blockbuster_active() -> bool:
    """True while a BlockBuster is activated: it swaps ``time.sleep`` for a wrapper that
    lives in the blockbuster module."""
    return "blockbuster" in (getattr(time.sleep, "__module__", None) or "")


_wraps_at_setup = pytest.StashKey[int]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    item.user_properties.append(("blockbuster", "on" if _blockbuster_active() else "off"))
    try:
        return (yield)
    finally:
        # before the call's report is made, so it carries the count
        wrapped = _apps_wrapped - item.stash.get(_wraps_at_setup, _apps_wrapped)
        item.user_properties.append(("apps_wrapped", str(wrapped)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("anyio_backend", "none") if callspec is not None else "none"
    item.stash[_wraps_at_setup] = _apps_wrapped
    item.user_properties.append(("nodeid", item.nodeid))
    item.user_properties.append(("backend", str(backend)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starlette's conftest turns blockbuster on only if it imports: refuse to compare runs
    where the guard is silently off."""
    conftest = sys.modules.get("tests.conftest")
    if conftest is not None and hasattr(conftest, "HAS_BLOCKBUSTER"):
        if not conftest.HAS_BLOCKBUSTER:
            raise pytest.UsageError(
                "starlette_wrap: Starlette's conftest could not import blockbuster, so its "
                "blocking-call guard is off; install blockbuster in this venv"
            )
        unguarded = [
            i.nodeid for i in session.items if "blockbuster" not in getattr(i, "fixturenames", ())
        ]
        if unguarded:
            raise pytest.UsageError(
                f"starlette_wrap: {len(unguarded)} test(s) without the blockbuster fixture, "
                f"e.g. {unguarded[0]}"
            )
