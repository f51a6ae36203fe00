"""The monitor of one event loop: its lifecycle, its heartbeat, and what the exporters read.

- a **heartbeat** on the loop (a chain of timer callbacks) wakes every ``interval`` and
  records the time;
- a **watchdog** thread (``watchdog``) runs one check of the loop's ``pipeline`` (detect →
  attribute → book → deliver) every interval;
- the exporters (``metrics``, ``live``, ``otel``) read the books through ``stats.WatchedLoop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, ClassVar

from loopwatch.accounting import Accountant
from loopwatch.book import BusySink
from loopwatch.config import Settings
from loopwatch.deliver import StallCallback
from loopwatch.frames import CodeFilter, FrameSource
from loopwatch.pipeline import Pipeline
from loopwatch.requests import (
    RequestRecord,
    bind_by_task,
    install_task_factory,
    own_context,
    own_owner,
    uninstall_task_factory,
)
from loopwatch.stats import LAG_BUCKETS, HistogramData, Shard, StatsBook
from loopwatch.watchdog import Watchdog

if TYPE_CHECKING:
    from loopwatch.otel import OtelBridge

__all__ = ["Monitor", "StallCallback"]

logger = logging.getLogger("loopwatch")

_CORO_FLAGS = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _loop_entry_codes() -> frozenset[CodeType]:
    """Called from a task on the loop: the Python frame that called into a C event loop
    (uvloop's ``run_until_complete``) is where an idle uvloop thread's stack ends."""
    frames = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    coroutines = [i for i, f in enumerate(frames) if f.f_code.co_flags & _CORO_FLAGS]
    if not coroutines or coroutines[-1] + 1 >= len(frames):
        return frozenset()
    caller = frames[coroutines[-1] + 1]
    if caller.f_code.co_filename.endswith(("events.py", "base_events.py")):
        return frozenset()  # a pure-Python loop: it idles in its selector instead
    return frozenset({caller.f_code})


def _import_threadpool_backend() -> None:
    """Import anyio's asyncio backend, if anyio is in use, on the watchdog's thread: the first
    call for the threadpool's limiter would import it on the loop (45-55 ms on anyio 3, more
    under load), a hold loopwatch would make and then blame on the app."""
    if "anyio" not in sys.modules:
        return
    try:
        importlib.import_module("anyio._backends._asyncio")
    except Exception:  # another anyio layout: the limiter is read without it
        logger.debug("loopwatch: anyio's asyncio backend not imported ahead", exc_info=True)


def _default_threadpool() -> Any:
    """anyio's default CapacityLimiter for the running loop: the threadpool that runs ``def``
    endpoints and ``run_in_threadpool``. Only when anyio is already loaded (Starlette loads
    it); runs on the loop, inside a task (anyio 3 finds its backend by the current task)."""
    anyio = sys.modules.get("anyio")
    if anyio is None:
        return None
    try:
        return anyio.to_thread.current_default_thread_limiter()
    except Exception:
        return None


def thread_alive(thread: threading.Thread | None) -> bool:
    return thread is not None and thread.is_alive()


def _await_exit(thread: threading.Thread, timeout: float) -> None:
    """``thread.join(timeout)`` for the loop's own thread, without a blocking lock wait there
    (a blocking-call detector would flag loopwatch): the watchdog wakes at once on stop and
    exits within one check, so yield the GIL to it until it has."""
    yield_gil = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))  # not on Windows
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        yield_gil()


class Monitor:
    """Watches one event loop. Use ``Monitor.for_loop(loop, settings)``; one per loop."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Monitor]] = (
        weakref.WeakKeyDictionary()
    )
    _registry_lock = threading.Lock()

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        frames: FrameSource = sys._current_frames,
        code_filter: CodeFilter | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.threshold = settings.threshold
        self.interval = settings.interval
        self._clock = clock
        self.lag = HistogramData(LAG_BUCKETS)
        self.last_beat = clock()
        # requests in flight on this loop, kept by the middleware
        self.requests: set[RequestRecord] = set()
        # loopwatch's own code on this loop runs bound to this owner: never the app's
        self.own = own_owner()
        self._own_context = own_context(self.own)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the heartbeat's next timer callback, and the context it runs in (loopwatch's own)
        self._heartbeat: asyncio.TimerHandle | None = None
        self._beat_context = self._own_context.copy()
        self._next_beat = 0.0  # when the heartbeat asked to run next (its lag is from then)
        self._beat_failed = False
        self._users: set[int] = set()
        self._loop_thread_id: int | None = None
        self._lock = threading.Lock()
        self.pipeline = Pipeline(
            loop, settings, clock=clock, frames=frames, code_filter=code_filter or CodeFilter(),
            own=self.own, requests=self.requests, lag=self.lag, on_loop=self._on_loop,
        )  # fmt: skip
        self.timeline = self.pipeline.timeline  # the last minutes, for the live page
        self._watchdog = Watchdog(
            self, interval=self.interval, threshold=self.threshold, clock=clock,
            stop=self._stop,
        )  # fmt: skip
        # stop() on the loop's thread: when the loop let go (the watchdog's last check closes
        # the hold there, off the loop) and whether it was running then; whether that last
        # check has run
        self._stopped: tuple[float, bool] | None = None
        self._last_checked = False
        self._next_sync = 0.0
        # anyio's default CapacityLimiter for this loop (the threadpool of def endpoints),
        # read by the heartbeat once the watchdog has imported anyio's backend off the loop;
        # read from the scrape thread, never awaited
        self.threadpool: Any = None
        self._backend_ready = False

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop, settings: Settings) -> Monitor:
        """The loop's monitor, created on first use. The first caller's settings win."""
        with cls._registry_lock:
            monitor = cls._by_loop.get(loop)
            if monitor is None or (monitor._stop.is_set() and monitor._thread is not None):
                monitor = cls._by_loop[loop] = cls(loop, settings)
            elif (monitor.threshold, monitor.interval) != (settings.threshold, settings.interval):
                logger.warning(
                    "loopwatch: this event loop is already watched with threshold=%s "
                    "interval=%s; ignoring threshold=%s interval=%s",
                    monitor.threshold, monitor.interval, settings.threshold, settings.interval,
                )  # fmt: skip
            return monitor

    @classmethod
    def current(cls, loop: asyncio.AbstractEventLoop | None = None) -> Monitor | None:
        if loop is None:
            loop = asyncio.get_running_loop()
        return cls._by_loop.get(loop)

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stop.is_set()

    @property
    def checks(self) -> int:
        """Watchdog checks done; ``settle`` waits for one more."""
        return self._watchdog.checks

    @property
    def heartbeat(self) -> asyncio.TimerHandle | None:
        return self._heartbeat

    def acquire(self, user: object) -> None:
        """Register a user (a middleware instance); start on the loop's thread if needed."""
        with self._lock:
            self._users.add(id(user))
            if self._thread is None:
                self._start()

    def release(self, user: object) -> None:
        """Unregister a user; the last one out stops the monitor."""
        with self._lock:
            self._users.discard(id(user))
            if self._users or self._thread is None:
                return
        self.stop()

    def _start(self) -> None:
        # Called on the loop's thread: that is the thread whose stack we will sample.
        self._loop_thread_id = threading.get_ident()
        # without loop time, requests are bound to their task, not their context (requests)
        bind_by_task(self.loop, not self.settings.loop_time)
        install_task_factory(self.loop)
        self.pipeline.start_on_loop(self._loop_thread_id, _loop_entry_codes())
        self._start_heartbeat()
        started_at = self._clock()
        self.pipeline.detector.started(started_at, time.process_time(), time.thread_time())
        self._thread = threading.Thread(
            target=self._watch, args=(threading.get_native_id(), started_at),
            name="loopwatch-watchdog", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _watch(self, native_id: int, started_at: float) -> None:
        self.pipeline.start_watching(native_id)
        _import_threadpool_backend()  # here, not on the loop: 50 ms or more on anyio 3
        self._backend_ready = True
        self._watchdog.run(started_at)

    def _start_heartbeat(self) -> None:
        self.last_beat = self._clock()
        self._next_beat = self.last_beat + self.interval
        # A chain of timer callbacks, not a task on asyncio.sleep: one loop callback a beat
        # instead of a task step and its sleep's future (most of an idle loop's cost), and
        # nothing in the app's asyncio.all_tasks() for it to wait on or cancel. In loopwatch's
        # own context: never part of a request, nor the app's background work, in any view.
        self._heartbeat = self.loop.call_later(
            self.interval, self._beat, context=self._beat_context
        )

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon, as loopwatch's own work (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop closed
            # a copy: a context is entered by one callback at a time
            self.loop.call_soon_threadsafe(fn, *args, context=self._own_context.copy())

    def settle(self, timeout: float) -> bool:
        """Wait until no hold is open and one full watchdog check has finished since the call,
        so a stall that ended just now has been delivered. False on timeout."""
        deadline = self._clock() + timeout
        step = self.interval / 4
        while self.running and self._clock() < deadline:
            if self.stalling:
                time.sleep(step)
                continue
            seen = self.checks
            while self.checks == seen and self.running:
                if self._clock() > deadline:
                    return False
                time.sleep(step)
            if not self.stalling:
                return True
        return not self.running

    def stop(self, timeout: float = 1.0, *, flush: bool = False) -> None:
        """Stop the watchdog and the heartbeat; returns within ``timeout`` seconds.

        On the loop's thread (an app's lifespan shutdown, or ``flush=True`` once the loop has
        stopped running, as a test runner does), the hold in progress ends now and its stall
        is delivered before this returns: a stall that ends as the app shuts down is not
        lost. The watchdog's last check delivers it (reading /proc, logging, calling back),
        not the loop's thread: that would be a blocking call on the loop."""
        on_loop = self._on_loop_thread()
        thread = self._thread
        if (flush or on_loop) and thread is not None:
            # The loop runs no code of the app while this runs: whatever held it let go now.
            self._stopped = (self._clock(), self.loop.is_running())
        self._stop.set()  # a beat that runs from now on schedules no other
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and not self.loop.is_closed():
            try:
                if on_loop:
                    heartbeat.cancel()
                else:
                    self.loop.call_soon_threadsafe(heartbeat.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if thread is not None and thread is not threading.current_thread():
            if on_loop:
                _await_exit(thread, timeout)
            else:
                thread.join(timeout)
        stopped = self._stopped
        if stopped is not None and not self._last_checked and not thread_alive(thread):
            self._last_check(*stopped)  # no watchdog left to do it
        self._remove_hooks()
        if not thread_alive(thread):
            self._forget()  # a stopped monitor is never restarted: fold its figures away
        with self._registry_lock:
            if self._by_loop.get(self.loop) is self:
                del self._by_loop[self.loop]

    def _last_check(self, stopped_at: float, running: bool) -> None:
        """Close the hold in progress as ended at ``stopped_at`` and deliver its stall: once,
        from the watchdog's thread if it still runs. A failure is logged, never raised into
        the app's shutdown."""
        self._last_checked = True
        try:
            self.pipeline.last_check(self.last_beat, stopped_at, running)
        except Exception:
            logger.exception("loopwatch: delivering the last stall at stop failed")

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread_id

    def _remove_hooks(self) -> None:
        """Stopping leaves no hook behind: the loop-time hook (after booking what it measured
        last) and the task factory."""
        try:
            self.pipeline.remove_hooks()
            uninstall_task_factory(self.loop)
            bind_by_task(self.loop, False)
        except Exception:  # called from the app's shutdown too: logged, never raised
            logger.exception("loopwatch: removing the loop-time hooks failed")

    def _forget(self) -> None:
        """The loop is gone: drop it from the registry and fold its aggregates away."""
        with self._registry_lock:
            if self._by_loop.get(self.loop) is self:
                del self._by_loop[self.loop]
        self.pipeline.ledger.retire()

    # -- heartbeat (on the loop) --------------------------------------------------------

    def _beat(self) -> None:
        if self._stop.is_set():
            return
        now = self._clock()
        previous, self.last_beat = self.last_beat, now
        try:
            if now - previous >= self.threshold:
                # a hold the watchdog may not have seen (it was kept out): the detector looks
                self.pipeline.detector.beat_late(previous, now)
            late = now - self._next_beat
            late = late if late > 0.0 else 0.0
            self.lag.observe(late)
            self.pipeline.lag_observed(late)  # OpenTelemetry: the watchdog records it
            if self._backend_ready:
                self._backend_ready = False  # once: the backend is loaded off the loop
                self.loop.create_task(self._read_threadpool())
        except Exception:  # logged once; the heartbeat goes on, or stalls would go unseen
            if not self._beat_failed:
                self._beat_failed = True
                logger.exception("loopwatch: the heartbeat failed; carrying on")
        self._next_beat = now + self.interval
        self._heartbeat = self.loop.call_later(
            self.interval, self._beat, context=self._beat_context
        )

    async def _read_threadpool(self) -> None:
        self.threadpool = _default_threadpool()

    # -- the watchdog's checks (its thread; ``watchdog.Checked``) ------------------------

    @property
    def stalling(self) -> bool:
        """The heartbeat is overdue right now (a hold is being watched or closed)."""
        return self.pipeline.detector.stalling

    def loop_closed(self) -> bool:
        return self.loop.is_closed()

    def check(self, kept_out: float) -> None:
        self.pipeline.check(self.last_beat, self.interval * 1.5, kept_out)

    def reset(self) -> None:
        self.pipeline.reset()

    def after_check(self, now: float) -> None:
        if now >= self._next_sync:
            # multiprocess mode: keep this worker's figures current for other workers'
            # scrapes; often while a stall is in progress, so its gauge stays live
            self._next_sync = now + (0.1 if self.stalling else 1.0)
            self.pipeline.ledger.sync_mirrors()

    def finish(self) -> None:
        stopped = self._stopped
        if stopped is not None:
            self._last_check(*stopped)  # stopped on the loop's thread, which waits for it
        elif self.stalling and self.loop.is_closed():
            try:  # the loop closed right after a stall: deliver it, as the next check would
                self.pipeline.detector.check(self.last_beat)
            except Exception:
                logger.debug("loopwatch: last check after the loop closed failed", exc_info=True)
        self._remove_hooks()
        self.pipeline.ledger.sync_mirrors()
        if self.loop.is_closed():
            self._forget()

    # -- read by the exporters and the middleware (``stats.WatchedLoop``) -----------------

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    @property
    def accountant(self) -> Accountant | None:
        """The loop-time accountant, when loop time is on."""
        return self.pipeline.accountant

    def loop_time_mode(self) -> str:
        """How this loop's loop time is measured: "exact", "sampled" or "off"."""
        accountant = self.accountant
        if accountant is None:
            return "off"
        return "exact" if accountant.exact else "sampled"

    def threadpool_stats(self) -> tuple[int, int, int] | None:
        """(size, busy threads, waiting tasks) of the loop's default threadpool, if known."""
        limiter = self.threadpool
        if limiter is None:
            return None
        try:
            stats = limiter.statistics()
            return (int(stats.total_tokens), int(stats.borrowed_tokens), int(stats.tasks_waiting))
        except Exception:  # read across threads: a torn read is skipped, not fatal
            return None

    def current_stall_seconds(self) -> float:
        """Age of the stall in progress, 0 when the loop is responsive."""
        if not self.running:
            return 0.0
        age = self._clock() - self.last_beat
        return age if age > self.threshold else 0.0

    def flush_loop_time(self) -> bool | None:
        """Book the loop time up to now (before a scrape). None when not accounted, else
        whether the server's own work is told apart."""
        accountant = self.accountant
        if accountant is None:
            return None
        accountant.drain(self.pipeline.in_flight_requests())
        return accountant.sees_server

    def stall_in_progress(self) -> tuple[tuple[str, str], float] | None:
        """((method, route), age) of the stall being booked right now, if any."""
        if not self.running:
            return None
        return self.pipeline.ledger.stall_in_progress()

    def hold_culprit(self) -> str | None:
        """``path:line in function`` most sampled so far in the hold in progress, if any."""
        hold = self.pipeline.detector.hold
        return hold.culprit() if hold is not None and hold.culprits else None

    # -- wiring (the middleware, the pytest plugin) ---------------------------------------

    def attach(self, book: StatsBook) -> Shard:
        """The shard this loop writes for ``book`` (one registry's aggregates)."""
        shard = self.pipeline.ledger.attach(book)
        book.watch(self)
        return shard

    @property
    def callbacks(self) -> list[StallCallback]:
        return self.pipeline.delivery.callbacks

    def add_callback(self, callback: StallCallback) -> None:
        self.pipeline.delivery.add_callback(callback)

    def remove_callback(self, callback: StallCallback) -> None:
        with contextlib.suppress(ValueError):
            self.pipeline.delivery.callbacks.remove(callback)

    def add_busy_sink(self, sink: BusySink) -> None:
        self.pipeline.ledger.busy_sinks.append(sink)

    def remove_busy_sink(self, sink: BusySink) -> None:
        with contextlib.suppress(ValueError):
            self.pipeline.ledger.busy_sinks.remove(sink)

    @property
    def otel(self) -> OtelBridge | None:
        return self.pipeline.delivery.otel

    def use_otel(self, bridge: OtelBridge) -> None:
        """Hand stalls to OpenTelemetry (the loop's first middleware with it wins)."""
        self.pipeline.use_otel(bridge)
