"""pytest plugin: fail the test whose code blocks the event loop.

Off until enabled (``--loopwatch``, the ini key ``loopwatch = true`` or ``LOOPWATCH_PYTEST=1``);
until then it only registers its options and its marker. Once enabled it wraps
``asyncio.BaseEventLoop.run_forever``, the one method every asyncio loop runs through
(pytest-asyncio's and anyio's runners, ``asyncio.run``, Starlette's ``TestClient`` portal,
a uvicorn server in a thread), so each run of a loop gets a ``Monitor`` for exactly as long as
the loop runs. Every stall is charged to the test (and phase, and fixture) that owns the loop,
and that test's report is turned into a failure naming the route, the culprit line, the
duration, ``cpu``/``wait`` and the loop thread's stack.

A loop is owned by the test during whose setup, call or teardown it started running. A stall in
a loop owned by a finished test, by a fixture wider than a function or by no test at all is not
blamed on whichever test happens to run: it is listed at the end of the run and fails the run.
Under pytest-xdist each worker sends its stalls to the controller, which lists them and writes
the one report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from loopwatch.config import ConfigError
from loopwatch.pytest_plugin.options import MARKER_HELP, pytest_addoption, read_options

if TYPE_CHECKING:
    from loopwatch.pytest_plugin.guard import Guard

__all__ = ["allow_blocking", "pytest_addoption", "pytest_configure", "pytest_unconfigure"]

# The guard of the configured session; None when the plugin is off. Its modules (and with
# them the monitor) are imported only when it is on.
_guard: Guard | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _guard
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        options = read_options(config)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    if options.enabled:
        from loopwatch.pytest_plugin.guard import Guard

        guard = Guard(config, options)
        config.pluginmanager.register(guard, "loopwatch-guard")
        guard.install()
        _guard = guard


def pytest_unconfigure(config: pytest.Config) -> None:
    global _guard
    guard = config.pluginmanager.get_plugin("loopwatch-guard")
    if guard is not None:
        guard.uninstall()
        config.pluginmanager.unregister(guard)
    if _guard is guard:
        _guard = None


@contextlib.contextmanager
def allow_blocking() -> Iterator[None]:
    """Exempt the blocking done inside this block (on any loop, any thread) from failing the
    test. A stall that runs past the block still fails if its part outside reaches the
    threshold. Does nothing when the plugin is disabled."""
    guard = _guard
    if guard is None:
        yield
        return
    window = guard.charges.open_window()
    try:
        yield
    finally:
        window[1] = time.time()
