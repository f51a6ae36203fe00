"""Each run of an event loop gets a monitor for exactly as long as it runs.

``asyncio.BaseEventLoop.run_forever`` (and uvloop's) is wrapped while the plugin is on: every
asyncio runner goes through it (pytest-asyncio's and anyio's, ``asyncio.run``, Starlette's
``TestClient`` portal, a uvicorn server in a thread). A run starts a ``Watch``: the loop's
monitor, whose stalls and loop time go to the charges (``charges``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loopwatch.monitor import Monitor
from loopwatch.pytest_plugin.options import settings_for
from loopwatch.pytest_plugin.records import Context
from loopwatch.stall import Stall

if TYPE_CHECKING:
    import asyncio

__all__ = ["LoopRuns", "Watch"]

# How long the end of a phase waits for loops in other threads to report a stall in progress.
SETTLE_SECONDS = 0.5

# the runs of the configured session, read by the patched run_forever; None when off
_active: LoopRuns | None = None


class Watch:
    """One run of one event loop (one ``run_forever`` call) and its monitor."""

    def __init__(
        self,
        monitor: Monitor,
        owner: Context | None,
        own: bool,
        *,
        on_main: bool,
        on_stall: Callable[[Watch, Stall], None],
        on_busy: Callable[[Watch, tuple[str, str], float], None],
    ) -> None:
        self.monitor = monitor
        self.owner = owner
        self.own = own  # we started the monitor, so we stop it when the run ends
        self.thread_name = threading.current_thread().name
        self.on_main = on_main
        self._on_stall = on_stall
        self._on_busy = on_busy
        # the lag the monitor's heartbeat had accumulated when this run was last settled
        self._settled_lag = monitor.lag.total

    def on_stall(self, stall: Stall) -> None:
        self._on_stall(self, stall)

    def on_busy(self, key: tuple[str, str], seconds: float) -> None:
        self._on_busy(self, key, seconds)

    def quiet(self) -> bool:
        """Nothing to settle: no hold is open or in progress, and none has ended since the
        last settle (the heartbeat has not been late by anything near the threshold), so no
        stall can be on its way. Checked without waiting for a watchdog check, which would
        cost a phase up to one check interval."""
        monitor = self.monitor
        # last_beat before the lag: the heartbeat records a late beat's lag, then the beat
        # (the monitor's clock is time.monotonic; the watchdog's own test of a late beat)
        fresh = time.monotonic() - monitor.last_beat <= monitor.interval * 1.5
        late = monitor.lag.total - self._settled_lag
        return fresh and late < (monitor.threshold - monitor.interval) / 2 and not monitor.stalling

    def settle(self, timeout: float) -> bool:
        lag = self.monitor.lag.total
        if not self.monitor.settle(timeout):
            return False
        self._settled_lag = lag
        return True

    def owner_text(self) -> str:
        owner = self.owner
        if owner is None:
            return "no test"
        return f"{owner.describe()} of {owner.nodeid}"


def charges_to_test(watch: Watch, now: Context | None) -> bool:
    """A loop in another thread belongs to the running test (so its stalls are charged to
    the test's current phase) if it started during that test, outside wider fixtures."""
    owner = watch.owner
    return (
        owner is not None
        and now is not None
        and owner.nodeid == now.nodeid
        and owner.fixture_scope in (None, "function")
    )


class LoopRuns:
    """The loops running now, each with its ``Watch``; the ``run_forever`` patch."""

    def __init__(
        self,
        threshold: float,
        context: Callable[[], Context | None],
        on_stall: Callable[[Watch, Stall], None],
        on_busy: Callable[[Watch, tuple[str, str], float], None],
    ) -> None:
        self.threshold = threshold
        self.main_thread = threading.get_ident()
        self._context = context
        self._on_stall = on_stall
        self._on_busy = on_busy
        self._lock = threading.Lock()
        self._live: set[Watch] = set()
        self._originals: list[tuple[type, Callable[..., Any] | None]] = []

    def install(self) -> None:
        global _active
        import asyncio

        classes: list[type] = [asyncio.BaseEventLoop]
        uvloop = sys.modules.get("uvloop")
        if uvloop is None and importlib.util.find_spec("uvloop") is not None:
            # uvloop's Loop does not derive from BaseEventLoop, and it must be patched before
            # a test creates one (uvicorn does, with loop="auto")
            uvloop = importlib.import_module("uvloop")
        if uvloop is not None and isinstance(getattr(uvloop, "Loop", None), type):
            classes.append(uvloop.Loop)
        for cls in classes:
            original = getattr(cls, "run_forever", None)
            if original is None or getattr(original, "__loopwatch__", False):
                continue
            # uvloop.Loop inherits run_forever from its compiled base: delete ours to restore
            self._originals.append((cls, cls.__dict__.get("run_forever")))
            cls.run_forever = _watched(original)  # type: ignore[attr-defined]
        _active = self

    def uninstall(self) -> None:
        global _active
        for cls, original in reversed(self._originals):
            if original is None:
                del cls.run_forever
            else:
                cls.run_forever = original
        self._originals.clear()
        if _active is self:
            _active = None

    # a loop starts and stops running (on the loop's thread) ----------------------------

    def enter(self, loop: asyncio.AbstractEventLoop) -> Watch:
        owner = self._context()
        threshold = owner.threshold if owner is not None else self.threshold
        monitor = Monitor.for_loop(loop, settings_for(threshold))
        own = not monitor.running
        watch = Watch(
            monitor, owner, own, on_main=threading.get_ident() == self.main_thread,
            on_stall=self._on_stall, on_busy=self._on_busy,
        )  # fmt: skip
        monitor.add_callback(watch.on_stall)
        monitor.add_busy_sink(watch.on_busy)
        monitor.acquire(watch)
        with self._lock:
            self._live.add(watch)
        return watch

    def leave(self, watch: Watch) -> None:
        monitor = watch.monitor
        try:
            if watch.own:
                # The core's users (a LoopWatchMiddleware) stay registered between runs, but a
                # loop that does not run would look blocked: stop it until the next run.
                # Stopping books the loop time measured last, to this run's test.
                monitor.stop(flush=True)
            else:
                monitor.flush_loop_time()
                monitor.release(watch)
                monitor.remove_callback(watch.on_stall)
        finally:
            monitor.remove_busy_sink(watch.on_busy)
            with self._lock:
                self._live.discard(watch)

    def settle(self, timeout: float = SETTLE_SECONDS) -> None:
        """Wait (bounded) until the loops in other threads whose stalls are charged to the
        running test have reported what blocked them so far, so a stall lands in the phase
        during which it happened. Loops owned by wider fixtures or other tests are not waited
        for: their stalls go to the end of the run whenever they arrive."""
        deadline = time.monotonic() + timeout
        for watch in self.settling():
            # the loop time booked so far is the phase's (the watchdog books it every 0.25 s)
            watch.monitor.flush_loop_time()
            if watch.quiet():
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not watch.settle(left):
                return

    def settling(self) -> list[Watch]:
        """The live watches a phase end has to settle."""
        now = self._context()
        with self._lock:
            return [w for w in self._live if not w.on_main and charges_to_test(w, now)]


def _watched(original: Callable[..., Any]) -> Callable[..., Any]:
    import asyncio

    @functools.wraps(original)
    def run_forever(self: asyncio.AbstractEventLoop) -> Any:
        runs = _active
        # A nested or invalid call raises in the original: leave it alone.
        if (
            runs is None
            or self.is_running()
            or self.is_closed()
            or asyncio._get_running_loop() is not None
        ):
            return original(self)
        watch = runs.enter(self)
        try:
            return original(self)
        finally:
            runs.leave(watch)

    run_forever.__loopwatch__ = True  # type: ignore[attr-defined]
    return run_forever
