"""One heartbeat coroutine and one watchdog thread per event loop.

The heartbeat wakes every ``interval`` on the loop and records the time. The watchdog thread
(``loopwatch-watchdog``) wakes on the same interval; when the heartbeat is overdue the loop is
held by whatever runs on it, so the watchdog samples the loop's current task (mapped to its
request by ``attribution``) and, once the hold grows long, the loop thread's stack. A change of
owner while the loop stays held splits the hold into separate stalls, so two blockers that run
back to back are reported apart, each with its own route and duration.
"""

from __future__ import annotations

import asyncio
import collections
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
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from loopwatch.accounting import Accountant, start_accounting
from loopwatch.attribution import (
    CodeFilter,
    FrameSource,
    RequestRecord,
    ServerCode,
    format_culprit,
    format_stack,
    install_task_factory,
    is_own,
    own_context,
    own_owner,
    owner_of,
    running_callback_owner,
    uninstall_task_factory,
)
from loopwatch.config import Settings
from loopwatch.profile import LoopSampler
from loopwatch.stall import BACKGROUND, SERVER, Stall, remember
from loopwatch.stats import LAG_BUCKETS, HistogramData, Shard, StatsBook
from loopwatch.timeline import Timeline

if TYPE_CHECKING:
    from loopwatch.otel import OtelBridge

__all__ = ["Monitor", "StallCallback"]

logger = logging.getLogger("loopwatch")

StallCallback = Callable[[Stall], Any]

# owner keys of code that runs outside any request: the app's (callbacks, startup tasks),
# the server's own (its protocol callbacks and tasks), and loopwatch's (never booked)
_BACKGROUND_KEY = object()
_SERVER_KEY = object()
_OWN_KEY = object()
_BACKGROUND_STALL = ("-", BACKGROUND)
_SERVER_STALL = ("-", SERVER)


# (time, the loop thread's CPU clock, its schedstat (on CPU, runnable but waiting)), read
# together; None where the platform has no such figure
_Figures = tuple[float, float | None, tuple[float, float] | None]


class _Booked(NamedTuple):
    """What the watchdog booked of a stall while it lasted: under which (method, route)
    (None: nothing yet), and how many seconds."""

    key: tuple[str, str] | None
    seconds: float


def _thread_schedstat(native_id: int) -> Callable[[], tuple[float, float]] | None:
    """Linux: (seconds on a CPU, seconds runnable but waiting for one) of a thread. The second
    tells a loop held by its code from a loop starved by a busy machine."""
    path = f"/proc/self/task/{native_id}/schedstat"

    def read() -> tuple[float, float]:
        with open(path, "rb") as f:
            on_cpu, waiting, _ = f.read().split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9

    try:
        read()
    except (OSError, ValueError):
        return None
    return read


def _thread_cpu_clock(thread_id: int) -> Callable[[], float] | None:
    try:
        clock_id = time.pthread_getcpuclockid(thread_id)
        time.clock_gettime(clock_id)
    except (AttributeError, OSError):  # not on this platform
        return None
    return lambda: time.clock_gettime(clock_id)


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
    it); runs on the loop, inside a task (the heartbeat)."""
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


class _Segment:
    """The loop held by one owner, from ``start`` until the owner changes or the loop frees."""

    __slots__ = (
        "booked_until",
        "confirmed",
        "counted",
        "cpu0",
        "cpu_t0",
        "culprits",
        "end",
        "idle",
        "in_flight",
        "key",
        "live_key",
        "next_long",
        "owner",
        "record",
        "sched0",
        "stack",
        "start",
        "told",
        "trace",
        "victims",
        "within",
    )  # fmt: skip

    def __init__(self, key: object, record: RequestRecord | None, owner: tuple[str, str],
                 start: float, cpu0: float | None, now: float, long_stall: float) -> None:  # fmt: skip
        self.key = key
        self.record = record
        # (method, route) that owns the hold, fixed as it is first seen (the loop is held,
        # so its request cannot be routed meanwhile): every view of the hold names it
        self.owner = owner
        self.start = start
        self.cpu0 = cpu0
        self.cpu_t0 = now
        self.sched0: tuple[float, float] | None = None
        self.idle = True  # every stack sample so far shows the loop waiting, not running code
        self.culprits: collections.Counter[tuple[str, int, str] | None] = collections.Counter()
        self.stack: str | None = None
        self.next_long = long_stall
        self.in_flight = 0
        # Live booking: once the hold is known to be a stall (``confirmed``), the watchdog
        # books its seconds every check up to ``booked_until``, under ``live_key`` (its
        # owner, once booked), and the close books the rest.
        self.confirmed = False
        self.counted = False
        self.booked_until = start
        self.live_key: tuple[str, str] | None = None
        # OpenTelemetry: the culprit's OTel context when first seen, the hold's end once
        # closed, and whether the other requests in flight were told (once, on the loop)
        self.trace: object = None
        self.end: float | None = None
        self.told = False
        # the other traced requests in flight as the hold was first seen (none can arrive
        # while the loop is held): told, live or at the close, and only they
        self.victims: tuple[RequestRecord, ...] = ()
        # (time, CPU clock, schedstat) read at the last check while the hold still lasted:
        # the close uses these, so the time between the hold's end and the check that sees
        # it (long on a loaded machine) is not mistaken for the hold's CPU or starvation
        self.within: _Figures | None = None


class _Episode:
    """The heartbeat is overdue: the loop has not run it since ``beat``."""

    __slots__ = ("beat", "last_sample", "segment")

    def __init__(self, beat: float, now: float) -> None:
        self.beat = beat
        self.last_sample = now
        self.segment: _Segment | None = None


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
        self._frames = frames
        self._filter = code_filter or CodeFilter()
        self.lag = HistogramData(LAG_BUCKETS)
        self.last_beat = clock()
        self.timeline = Timeline()  # the last minutes, one point a second, for the live page
        # requests in flight on this loop, kept by the middleware
        self.requests: set[RequestRecord] = set()
        # loopwatch's own code on this loop runs bound to this owner: never the app's
        self.own = own_owner()
        self._own_context = own_context(self.own)
        self._server_code = ServerCode()
        # loop time per request (accounting), when on
        self.accountant: Accountant | None = None
        # more takers of booked loop time, beside the books (the pytest plugin's per test)
        self.busy_sinks: list[Callable[[tuple[str, str], float], None]] = []
        self.books: dict[StatsBook, Shard] = {}
        self.callbacks: list[StallCallback] = []
        self._failed_callbacks: set[int] = set()
        self._users: set[int] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread_id: int | None = None
        self._cpu: Callable[[], float] | None = None
        self._sched: Callable[[], tuple[float, float]] | None = None
        self._idle_codes: frozenset[CodeType] = frozenset()
        self._episode: _Episode | None = None
        # ((method, route), start) of the stall being booked live, for the in-progress gauge
        self._live: tuple[tuple[str, str], float] | None = None
        self._tick_failed = False
        # stop() on the loop's thread: when the loop let go (the watchdog's last check closes
        # the hold there, off the loop) and whether it was running then; whether that last
        # check has run
        self._stopped: tuple[float, bool] | None = None
        self._last_checked = False
        self.checks = 0  # watchdog checks done; settle() waits for one more
        self._lock = threading.Lock()
        # anyio's default CapacityLimiter for this loop (the threadpool of def endpoints),
        # read by the heartbeat once the watchdog has imported anyio's backend off the loop;
        # read from the scrape thread, never awaited
        self.threadpool: Any = None
        self._backend_ready = False
        # OpenTelemetry (``loopwatch.otel``), when a middleware found a real provider; the
        # heartbeat hands its lag values to it through ``lag_tap``
        self.otel: OtelBridge | None = None
        self.lag_tap: collections.deque[float] | None = None
        self._otel_failed = False

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
        self._idle_codes = _loop_entry_codes()
        install_task_factory(self.loop)
        if self.settings.loop_time:
            self.accountant = start_accounting(self.loop, self._book_busy)
        self._start_heartbeat()
        self._thread = threading.Thread(
            target=self._watch, args=(threading.get_native_id(),),
            name="loopwatch-watchdog", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _watch(self, native_id: int) -> None:
        # The CPU clock and schedstat probes read /proc: here, never on the loop it watches.
        self._cpu = _thread_cpu_clock(self._loop_thread_id or 0)
        self._sched = _thread_schedstat(native_id)
        self._server_code.dirs()
        _import_threadpool_backend()  # here, not on the loop: 50 ms or more on anyio 3
        self._backend_ready = True
        self._run()

    def _start_heartbeat(self) -> None:
        if self._stop.is_set() or self.loop.is_closed():
            return
        self.last_beat = self._clock()
        # loopwatch's own context: the heartbeat is never part of a request, nor the app's
        # background work, in any view
        heartbeat = self._own_context.run(self.loop.create_task, self._beat())
        # a loop may close without running it again (shutdown): that is not an error
        heartbeat._log_destroy_pending = False  # type: ignore[attr-defined]
        self._heartbeat = heartbeat

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    @property
    def stalling(self) -> bool:
        """The heartbeat is overdue right now (a hold is being watched or closed)."""
        return self._episode is not None

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
        self._stop.set()
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and not self.loop.is_closed():
            try:
                if self._on_loop_thread():
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
            if running:
                # Up to date first (the last check may be long ago on a busy machine): a hold
                # that ended is closed, one in progress not seen yet is opened. A loop that
                # no longer runs was not held: nothing is opened for it.
                self._tick()
            episode = self._episode
            if episode is not None:
                if self.last_beat == episode.beat:
                    self.last_beat = stopped_at  # the hold ended when the loop stopped
                self._tick()
        except Exception:
            logger.exception("loopwatch: delivering the last stall at stop failed")

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread_id

    # -- heartbeat (on the loop) --------------------------------------------------------

    async def _beat(self) -> None:
        clock, interval, lag, sleep = self._clock, self.interval, self.lag, asyncio.sleep
        expected = clock() + interval
        try:
            while True:
                await sleep(interval)
                if self.threadpool is None and self._backend_ready:
                    self.threadpool = _default_threadpool()  # once: the backend is loaded
                    self._backend_ready = False
                now = clock()
                late = now - expected if now > expected else 0.0
                lag.observe(late)
                tap = self.lag_tap  # OpenTelemetry metrics: the watchdog records it
                if tap is not None:
                    tap.append(late)
                self.last_beat = now
                expected = now + interval
        finally:
            # cancelled as the loop shuts down: running this proves the loop is free again,
            # so the watchdog can still close (and report) a stall that ended just now
            self.last_beat = clock()

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

    def _book_busy(self, key: tuple[str, str], seconds: float) -> None:
        for book, shard in list(self.books.items()):
            book.book_busy(shard, key, seconds)
        for sink in list(self.busy_sinks):
            sink(key, seconds)

    def flush_loop_time(self) -> bool | None:
        """Book the loop time up to now (before a scrape). None when not accounted, else
        whether the server's own work is told apart."""
        accountant = self.accountant
        if accountant is None:
            return None
        accountant.drain(list(self.requests))
        return accountant.sees_server

    def stall_in_progress(self) -> tuple[tuple[str, str], float] | None:
        """((method, route), age) of the stall being booked right now, if any."""
        live = self._live
        if live is None or not self.running:
            return None
        return live[0], self._clock() - live[1]

    def hold_culprit(self) -> str | None:
        """``path:line in function`` most sampled so far in the hold in progress, if any."""
        episode = self._episode
        segment = episode.segment if episode is not None else None
        if segment is None:
            return None
        try:
            top = segment.culprits.most_common(1)
        except RuntimeError:  # the watchdog added a sample meanwhile: next poll
            return None
        return format_culprit(top[0][0]) if top else None

    # -- watchdog (own thread) ----------------------------------------------------------

    def _run(self) -> None:
        interval = self.interval
        # While the loop is healthy, check less often (each wake-up of a thread costs CPU on
        # an idle server); once the heartbeat is late, every interval. A hold is still timed
        # from the last heartbeat, so only the split of back-to-back holders can move, by
        # at most the difference.
        relaxed = max(interval, min(self.threshold / 4, 2.5 * interval))
        wait = interval
        next_sync = next_drain = 0.0
        sampler = LoopSampler(self) if self.settings.profile else None
        while not self._stop.wait(wait):
            if self.loop.is_closed():
                break
            try:
                self.timeline.tick(self)
                self._tick()
                accountant = self.accountant
                if accountant is not None:
                    accountant.check()
                    if self._clock() >= next_drain:
                        next_drain = self._clock() + 0.25
                        accountant.drain(list(self.requests))
                if sampler is not None:
                    sampler.sample()  # the loop profile: where the loop time goes
            except Exception:
                if not self._tick_failed:  # once, not 100 times a second
                    self._tick_failed = True
                    logger.exception("loopwatch: watchdog check failed; carrying on")
                self._episode = None
                self._live = None
            self.checks += 1
            wait = interval if self._episode is not None else relaxed
            self._check_heartbeat()
            now = self._clock()
            if now >= next_sync:
                # multiprocess mode: keep this worker's figures current for other workers'
                # scrapes; often while a stall is in progress, so its gauge stays live
                next_sync = now + (0.1 if self._episode is not None else 1.0)
                self._sync_mirrors()
        self._stop.set()
        stopped = self._stopped
        if stopped is not None:
            self._last_check(*stopped)  # stopped on the loop's thread, which waits for it
        elif self._episode is not None and self.loop.is_closed():
            try:  # the loop closed right after a stall: deliver it, as the next check would
                self._tick()
            except Exception:
                logger.debug("loopwatch: last check after the loop closed failed", exc_info=True)
        self._remove_hooks()
        self._sync_mirrors()
        if self.loop.is_closed():
            self._forget()

    def _remove_hooks(self) -> None:
        """Stopping leaves no hook behind: the loop-time hook (after booking what it measured
        last) and the task factory."""
        try:
            accountant = self.accountant
            if accountant is not None:
                accountant.stop()
                accountant.drain(list(self.requests))
            uninstall_task_factory(self.loop)
        except Exception:  # called from the app's shutdown too: logged, never raised
            logger.exception("loopwatch: removing the loop-time hooks failed")

    def _forget(self) -> None:
        """The loop is gone: drop it from the registry and fold its aggregates away."""
        with self._registry_lock:
            if self._by_loop.get(self.loop) is self:
                del self._by_loop[self.loop]
        for book, shard in list(self.books.items()):
            book.retire(shard)
        self.books.clear()

    def _sync_mirrors(self) -> None:
        for book in list(self.books):
            if book.mirror is not None:
                try:
                    book.mirror()
                except Exception:
                    if not self._tick_failed:
                        self._tick_failed = True
                        logger.exception("loopwatch: multiprocess metrics sync failed")

    def _check_heartbeat(self) -> None:
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat.done() and not self._stop.is_set():
            if heartbeat.cancelled():  # often the loop shutting down (asyncio.run)
                logger.info("loopwatch: the heartbeat task was cancelled; restarting it")
            else:
                logger.warning("loopwatch: the heartbeat task ended; restarting it")
            self._heartbeat = None
            try:
                self.loop.call_soon_threadsafe(self._start_heartbeat)
            except RuntimeError:
                self._stop.set()

    def _tick(self) -> None:
        otel = self.otel
        if otel is not None and self.lag_tap:
            otel.record_lag(self.lag_tap)
        now = self._clock()
        beat = self.last_beat
        episode = self._episode
        if episode is not None and beat != episode.beat:
            # The heartbeat ran again: the hold ended no later than that.
            self._episode = None
            if episode.segment is not None:
                self._close(episode.segment, end=beat, now=now)
            episode = None
        if now - beat <= self.interval * 1.5:
            return
        if episode is None:
            episode = self._episode = _Episode(beat, now)
        task = asyncio.current_task(self.loop)
        key, record = self._owner(task)
        segment = episode.segment
        if segment is None or segment.key is not key:
            if segment is None:
                start = beat  # the loop was free when the heartbeat last ran
            else:
                start = (episode.last_sample + now) / 2
                self._close(segment, end=start, now=now)
            cpu0 = self._cpu() if self._cpu is not None else None
            segment = episode.segment = _Segment(
                key, record, self._owner_key(key, record), start, cpu0, now,
                self.settings.long_stall,
            )  # fmt: skip
            segment.in_flight = self.in_flight  # the requests the stall holds up
            if otel is not None:
                segment.trace = otel.context_of(task, record)
                if otel.tracing:
                    segment.victims = self._victims(record)
            if self._sched is not None:
                segment.sched0 = self._sched()
        episode.last_sample = now
        age = now - segment.start
        if age >= self.threshold / 2:
            self._sample_stack(segment, age, now)
            segment.within = self._figures(now)
        if age >= self.threshold:
            self._book_live(segment, age, now)
            if segment.confirmed:
                # Tell the other requests in flight before they answer (and their spans
                # end): on the loop, first thing once it is free again.
                self._schedule_telling(segment)

    def _owner(self, task: asyncio.Task[Any] | None) -> tuple[object, RequestRecord | None]:
        """Who holds the loop now, as the watchdog sees it: (owner key, request or None).

        The one rule every view follows (loop time charges callbacks the same way): a task
        step belongs to the request bound in the task's context; a plain callback to the
        request whose context it was scheduled in (``call_later`` from a request); code of
        the server's own (its tasks, its protocol callbacks) to ``<server>``; loopwatch's own
        to none of the app's books; anything else to ``<background>``."""
        if task is not None:
            record = owner_of(task)
            if record is None:
                server = self._server_code.task_is_server(task)
                return (_SERVER_KEY if server else _BACKGROUND_KEY), None
        else:
            frame = self._frames().get(self._loop_thread_id or 0)
            found = running_callback_owner(frame, self._server_code, self._idle_codes)
            if found is None:
                return _BACKGROUND_KEY, None
            if isinstance(found, str):
                return _SERVER_KEY, None
            record = found
        if record is self.own or is_own(record):
            return _OWN_KEY, None
        return record, record

    @staticmethod
    def _owner_key(key: object, record: RequestRecord | None) -> tuple[str, str]:
        """(method, route) of a hold's owner, fixed as it is first seen. A request's code
        before it is routed (a middleware inside loopwatch) is ``<routing>``, or
        ``<unmatched>`` in an app with no router: the route it gets later is not known
        while the loop is held, and a hold has one owner in every view."""
        if record is not None:
            return (record.method, record.owner_route())
        return _SERVER_STALL if key is _SERVER_KEY else _BACKGROUND_STALL

    def _figures(self, now: float) -> _Figures:
        """The loop thread's CPU clock and schedstat, read now (``now`` is their time)."""
        return (
            now,
            self._cpu() if self._cpu is not None else None,
            self._sched() if self._sched is not None else None,
        )

    def _victims(self, culprit: RequestRecord | None) -> tuple[RequestRecord, ...]:
        """The traced requests in flight but ``culprit``, copied off the loop's set (which
        the loop may change if it just let go: then a second try)."""
        for _ in range(2):
            try:
                requests = tuple(self.requests)
            except RuntimeError:  # changed size during the copy
                continue
            return tuple(r for r in requests if r is not culprit and r.trace is not None)
        return ()

    def _schedule_telling(self, segment: _Segment) -> None:
        otel = self.otel
        if segment.told or otel is None or not otel.tracing:
            return
        segment.told = True
        if segment.victims:
            with contextlib.suppress(RuntimeError):  # the loop closed
                self.loop.call_soon_threadsafe(
                    self._tell_victims, segment, context=self._own_context
                )

    def _book_live(self, segment: _Segment, age: float, now: float) -> None:
        """Book the stall's seconds while it lasts, so ``rate()`` shows a freeze as it
        happens. The same tests as ``_close`` decide first that the hold is a stall."""
        if segment.key is _OWN_KEY:
            return  # loopwatch's own: never the app's
        if not segment.confirmed:
            if segment.key is _BACKGROUND_KEY and segment.idle and segment.culprits:
                return  # a paused or starved process idle in its selector: no code
            sched, sched0 = self._sched, segment.sched0
            if (
                sched is not None
                and sched0 is not None
                and age - (sched()[1] - sched0[1]) < (self.threshold)
            ):
                return  # so far mostly CPU starvation
            segment.confirmed = True
        key = segment.owner
        stalls = 0 if segment.counted else 1
        segment.counted = True
        seconds = now - segment.booked_until
        segment.booked_until = now
        segment.live_key = key
        self._live = (key, segment.start)
        for book, shard in list(self.books.items()):
            book.book_stall_time(shard, key[0], key[1], stalls, seconds)

    def _sample_stack(self, segment: _Segment, age: float, now: float) -> None:
        frame = self._frames().get(self._loop_thread_id or 0)
        if frame is None:
            return
        segment.culprits[self._filter.culprit(frame)] += 1
        if segment.idle and not self._is_idle(frame):
            segment.idle = False
        if segment.stack is None and age >= self.threshold:
            segment.stack = format_stack(frame)
        if age >= segment.next_long and segment.key is not _OWN_KEY:
            segment.next_long *= 2
            method, route = segment.owner
            logger.warning(
                "event loop blocked for %.1fs so far (still blocked) by %s %s at %s\n%s",
                age, method, route,
                format_culprit(self._filter.culprit(frame)), format_stack(frame),
            )  # fmt: skip

    def _is_idle(self, frame: FrameType) -> bool:
        """The loop is waiting for I/O (in its selector, or inside a C loop's run call), not
        running a callback: a late heartbeat then means the process was paused or starved."""
        code = frame.f_code
        return code in self._idle_codes or (
            code.co_name == "select" and code.co_filename.endswith("selectors.py")
        )

    def _close(self, segment: _Segment, end: float, now: float) -> None:
        segment.end = end
        if self._live is not None and self._live[1] == segment.start:
            self._live = None
        duration = end - segment.start
        confirmed = segment.confirmed  # booked live already: a stall whatever comes next
        if duration < self.threshold and not confirmed:
            return
        if segment.key is _OWN_KEY:
            logger.debug("loopwatch: %.3fs hold in loopwatch's own code: not the app's", duration)
            return
        if segment.key is _BACKGROUND_KEY and segment.idle and segment.culprits and not confirmed:
            logger.debug("loopwatch: %.3fs late heartbeat with the loop idle: not code", duration)
            return
        kind = "wait"
        cpu_seconds = 0.0
        within = segment.within
        if within is None or within[0] > end:  # a hold too short to have been read inside
            within = self._figures(now)
        until, cpu_now, sched_now = within
        wall = until - segment.cpu_t0  # the part of the segment the CPU figures cover
        if sched_now is not None and segment.sched0 is not None:
            on_cpu, starved = (b - a for a, b in zip(segment.sched0, sched_now, strict=True))
            if duration - starved < self.threshold and not confirmed:
                # runnable but not scheduled: the machine was busy, the code did not block
                logger.debug("loopwatch: %.3fs hold was CPU starvation, not a stall", duration)
                return
            cpu_seconds = on_cpu
            if wall > starved and on_cpu >= 0.5 * (wall - starved):
                kind = "cpu"
        elif cpu_now is not None and segment.cpu0 is not None:
            cpu_seconds = cpu_now - segment.cpu0
            if wall > 0 and cpu_seconds >= 0.5 * wall:
                kind = "cpu"
        # a stall not confirmed while it lasted (short, or first taken for starvation): its
        # victims are told now; those that answered meanwhile are skipped (span ended)
        self._schedule_telling(segment)
        top = segment.culprits.most_common(1)
        method, route = segment.owner
        stall = Stall(
            route=route,
            method=method,
            kind=kind,
            duration=duration,
            started_at=time.time() - (now - segment.start),
            culprit=format_culprit(top[0][0] if top else None),
            stack=segment.stack or "",
            requests_in_flight=max(segment.in_flight, self.in_flight),
            cpu_seconds=cpu_seconds,
            **(self.otel.stall_fields(segment.trace) if self.otel is not None else {}),
        )
        # what the live booking already counted, so the stall is booked once in all
        self.deliver(stall, booked=_Booked(segment.live_key, segment.booked_until - segment.start))

    def _tell_victims(self, segment: _Segment) -> None:
        """On the loop, as soon as a stall lets go of it: every other traced request in flight
        waited through it (none can finish while the loop is held), and is told now, before
        it resumes and its span ends."""
        otel = self.otel
        if otel is None:
            return
        end = segment.end if segment.end is not None else self._clock()
        try:
            culprits = dict(segment.culprits)  # one C-level copy: the watchdog may sample
        except RuntimeError:
            culprits = {}
        top = max(culprits, key=culprits.__getitem__) if culprits else None
        method, route = segment.owner
        try:
            otel.tell_victims(
                segment.victims, method=method, route=route, culprit=format_culprit(top),
                duration=end - segment.start,
                started_at=time.time() - (self._clock() - segment.start),
                culprit_trace=segment.trace,
            )  # fmt: skip
        except Exception:
            if not self._otel_failed:
                self._otel_failed = True
                logger.exception("loopwatch: OpenTelemetry victim events failed")

    # -- reporting ----------------------------------------------------------------------

    def deliver(self, stall: Stall, *, booked: _Booked | None = None) -> None:
        """Send a finished stall to the ring, the log, the metrics and the callbacks.
        ``booked``: what the watchdog already counted of it while it lasted."""
        remember(stall)
        traced = stall.trace_id != ""
        extra = {"trace_id": stall.trace_id, "span_id": stall.span_id} if traced else None
        logger.warning("%s", stall.describe(), extra=extra)
        if stall.stack and logger.isEnabledFor(logging.DEBUG):
            logger.debug("loop thread stack during the stall:\n%s", stall.stack)
        key = (stall.method, stall.route)
        if booked is None or booked.key is None:
            stalls, seconds = 1, stall.duration
        else:
            # the rest of it, under the route it was booked for while it lasted
            key, stalls, seconds = booked.key, 0, max(0.0, stall.duration - booked.seconds)
        exemplar = (stall.trace_id, stall.span_id, stall.started_at + stall.duration)
        for book, shard in list(self.books.items()):
            book.observe_stall(
                shard, stall.method, stall.route, stall.kind, stall.duration,
                exemplar if traced else None,
            )  # fmt: skip
            book.book_stall_time(shard, key[0], key[1], stalls, seconds)
        self._sync_mirrors()  # multiprocess mode: other workers' scrapes see it now
        otel = self.otel
        if otel is not None:
            try:
                otel.record_stall(stall)
            except Exception:
                if not self._otel_failed:
                    self._otel_failed = True
                    logger.exception("loopwatch: OpenTelemetry stall span/metric failed")
        for callback in list(self.callbacks):
            try:
                callback(stall)
            except Exception:
                if id(callback) not in self._failed_callbacks:
                    self._failed_callbacks.add(id(callback))
                    logger.exception("loopwatch: on_stall callback %r failed", callback)

    def attach(self, book: StatsBook) -> Shard:
        """The shard this loop writes for ``book`` (one registry's aggregates)."""
        shard = self.books.get(book)
        if shard is None:
            with self._lock:
                shard = self.books.get(book)
                if shard is None:
                    shard = self.books[book] = book.new_shard()
                    shard.lag = self.lag
                    book.monitors.add(self)
        return shard

    def add_callback(self, callback: StallCallback) -> None:
        if callback not in self.callbacks:
            self.callbacks.append(callback)
