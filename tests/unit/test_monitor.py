"""The monitor on a bare event loop (no web framework): detection, survival, shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

from loopwatch import BACKGROUND, Settings
from loopwatch.monitor import Monitor
from tests.helpers import StallLog, eventually


class LoopThread:
    """An event loop running in its own thread, like a server's."""

    def __init__(self, loop_impl: str = "asyncio") -> None:
        if loop_impl == "uvloop":
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        done = threading.Event()
        result = []

        def run() -> None:
            result.append(fn(*args))
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(5)
        return result[0]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def start_monitor(lt: LoopThread, **options: float) -> tuple[Monitor, StallLog]:
    settings = Settings.resolve(env={}, **options)
    log = StallLog()
    monitor = lt.call(lambda: Monitor(lt.loop, settings))
    monitor.add_callback(log)
    lt.call(monitor.acquire, lt)
    return monitor, log


def test_a_blocking_callback_is_a_background_stall(loop_thread: LoopThread) -> None:
    monitor, log = start_monitor(loop_thread)

    def block() -> None:
        time.sleep(0.4)

    loop_thread.loop.call_soon_threadsafe(block)
    [stall] = log.wait_for(1)
    assert stall.route == BACKGROUND and stall.method == "-"
    assert 0.34 <= stall.duration <= 0.46
    assert "in block" in stall.culprit
    monitor.stop()


def test_blocks_under_the_threshold_are_not_stalls(loop_thread: LoopThread) -> None:
    monitor, log = start_monitor(loop_thread, threshold=0.3)
    for _ in range(3):
        loop_thread.loop.call_soon_threadsafe(time.sleep, 0.1)
        time.sleep(0.2)
    time.sleep(0.3)
    assert log.stalls == []
    assert monitor.lag.counts[-1] == 0 and sum(monitor.lag.counts) > 10
    monitor.stop()


def test_a_failing_frame_source_is_logged_once_and_survived(
    loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def broken_frames() -> dict[int, FrameType]:
        calls.append(1)
        raise RuntimeError("frame source exploded")

    settings = Settings.resolve(env={})
    monitor = loop_thread.call(lambda: Monitor(loop_thread.loop, settings, frames=broken_frames))
    log = StallLog()
    monitor.add_callback(log)
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        loop_thread.call(monitor.acquire, loop_thread)
        for _ in range(2):
            loop_thread.loop.call_soon_threadsafe(time.sleep, 0.3)
            time.sleep(0.6)
    failures = [r for r in caplog.records if "watchdog check failed" in r.getMessage()]
    assert len(failures) == 1 and len(calls) >= 2
    assert monitor.running
    monitor.stop()


def test_a_failing_callback_is_logged_once_and_others_still_run(
    loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    monitor, log = start_monitor(loop_thread)

    def bad(stall: object) -> None:
        raise ValueError("callback bug")

    monitor.callbacks.insert(0, bad)
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        for _ in range(2):
            loop_thread.loop.call_soon_threadsafe(time.sleep, 0.3)
            time.sleep(0.5)
        log.wait_for(2)
    assert len([r for r in caplog.records if "on_stall callback" in r.getMessage()]) == 1
    monitor.stop()


@pytest.mark.parametrize("loop_impl", ["asyncio", "uvloop"])
def test_the_heartbeat_is_no_task_of_the_apps(loop_impl: str) -> None:
    """The app's ``asyncio.all_tasks()`` has nothing of loopwatch's to wait on or cancel: an
    app that cancels every task at shutdown, or a test that asserts none is left, sees none,
    and stalls are still found afterwards."""
    lt = LoopThread(loop_impl)
    try:
        monitor, log = start_monitor(lt)

        async def cancel_all() -> int:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            return len(others)

        assert asyncio.run_coroutine_threadsafe(cancel_all(), lt.loop).result(5) == 0
        beat = monitor.last_beat
        eventually(lambda: monitor.last_beat > beat)
        lt.loop.call_soon_threadsafe(time.sleep, 0.3)
        log.wait_for(1)
        assert log.stalls[0].duration == pytest.approx(0.3, abs=0.1)
        monitor.stop()
    finally:
        lt.close()


def test_a_heartbeat_that_fails_is_logged_once_and_goes_on(
    loop_thread: LoopThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor, log = start_monitor(loop_thread)

    class Broken:
        def observe(self, value: float) -> None:
            raise ValueError("lag bug")

    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        monkeypatch.setattr(monitor, "lag", Broken())
        time.sleep(0.2)  # about 20 beats
        beat = monitor.last_beat
        eventually(lambda: monitor.last_beat > beat)
        loop_thread.loop.call_soon_threadsafe(time.sleep, 0.3)
        log.wait_for(1)
    failures = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert len(failures) == 1
    monitor.stop()


@pytest.mark.parametrize("loop_impl", ["asyncio", "uvloop"])
def test_a_collection_on_the_watchdogs_own_thread_is_one_gc_stall(loop_impl: str) -> None:
    """The collector runs on whichever thread allocates, sometimes the watchdog's. It keeps
    the GIL, so it holds the loop, while the watchdog, collecting, cannot look; by its next
    check the heartbeat has run again. The heartbeat's lateness and the collector's record
    still make it one gc stall (the def-route app's stall, once lost in CI that way)."""
    heap = [[i] for i in range(1_500_000)]  # 0.1-0.3 s a full collection: twice the threshold
    armed = threading.Event()
    collections: list[tuple[float, float]] = []

    class CollectingMonitor(Monitor):
        def after_check(self, now: float) -> None:  # on the watchdog's thread
            super().after_check(now)
            if armed.is_set():
                armed.clear()
                began = time.monotonic()
                gc.collect()
                collections.append((began, time.monotonic()))

    lt = LoopThread(loop_impl)
    try:
        log = StallLog()
        monitor = lt.call(
            lambda: CollectingMonitor(lt.loop, Settings.resolve(env={}, threshold=0.05))
        )
        monitor.add_callback(log)
        lt.call(monitor.acquire, lt)
        time.sleep(0.2)
        armed.set()
        [stall] = log.wait_for(1)
        time.sleep(0.3)  # nothing more comes of it
        monitor.stop()
    finally:
        lt.close()
        del heap
    [(began, ended)] = collections
    assert log.stalls == [stall]
    assert (stall.method, stall.route, stall.kind, stall.gc_generation) == (
        "-", BACKGROUND, "gc", 2,
    )  # fmt: skip
    assert stall.gc_seconds == pytest.approx(ended - began, abs=0.03)
    assert ended - began - 0.03 <= stall.duration <= ended - began + 0.1


def test_stopping_leaves_no_heartbeat_behind(loop_thread: LoopThread) -> None:
    monitor, _ = start_monitor(loop_thread)
    time.sleep(0.1)
    monitor.stop()
    beat = monitor.last_beat
    time.sleep(0.1)
    assert monitor.last_beat == beat
    assert monitor.heartbeat is None


def test_stop_returns_within_a_second_during_a_stall(loop_thread: LoopThread) -> None:
    monitor, _ = start_monitor(loop_thread)
    loop_thread.loop.call_soon_threadsafe(time.sleep, 2.0)
    time.sleep(0.3)
    assert monitor.current_stall_seconds() > 0.2
    started = time.monotonic()
    monitor.stop()
    assert time.monotonic() - started < 1.0
    assert not monitor.running
    eventually(lambda: not [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"])


def test_the_watchdog_ends_with_its_loop() -> None:
    lt = LoopThread()
    monitor = lt.call(Monitor.for_loop, lt.loop, Settings.resolve(env={}))
    lt.call(monitor.acquire, lt)
    assert Monitor.current(lt.loop) is monitor
    assert [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"]
    lt.close()  # no release, no lifespan: the loop simply goes away
    eventually(lambda: not [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"])
    assert Monitor.current(lt.loop) is None


def test_one_monitor_per_loop(loop_thread: LoopThread) -> None:
    settings = Settings.resolve(env={})
    a = loop_thread.call(Monitor.for_loop, loop_thread.loop, settings)
    b = loop_thread.call(Monitor.for_loop, loop_thread.loop, settings)
    assert a is b


def test_a_stall_that_ends_as_the_last_user_releases_is_delivered(
    loop_impl: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An app's lifespan shutdown: a handler blocks, then the middleware releases the monitor
    # in the same loop step; the heartbeat never runs again to close the hold.
    lt = LoopThread(loop_impl)
    try:
        monitor, log = start_monitor(lt)
        delivered_on: list[str] = []
        monitor.add_callback(lambda stall: delivered_on.append(threading.current_thread().name))

        def shutdown_handler_then_release() -> None:
            time.sleep(0.4)
            monitor.release(lt)

        with caplog.at_level(logging.WARNING, logger="loopwatch"):
            lt.call(shutdown_handler_then_release)
            # delivered before release() returned, not by a watchdog that may be gone
            assert len(log.stalls) == 1
        # by the watchdog's last check, while the loop's thread waited: never on the loop
        assert delivered_on == ["loopwatch-watchdog"]
        [stall] = log.stalls
        assert stall.route == BACKGROUND and 0.34 <= stall.duration <= 0.5
        assert "in shutdown_handler_then_release" in stall.culprit
        assert [r for r in caplog.records if "event loop blocked for" in r.getMessage()]
        assert not monitor.running
        eventually(lambda: not [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"])
    finally:
        lt.close()


def test_a_failing_hook_removal_is_logged_and_stop_still_returns(
    loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    monitor, _ = start_monitor(loop_thread)
    accountant = monitor.accountant
    assert accountant is not None

    def broken() -> None:
        raise RuntimeError("hook removal bug")

    accountant.stop = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        loop_thread.call(monitor.stop)  # on the loop's thread, as an app's shutdown does
    assert not monitor.running
    assert [r for r in caplog.records if "removing the loop-time hooks" in r.getMessage()]
    assert hasattr(asyncio.events.Handle._run, "__loopwatch__")  # still wrapped: put it back
    from loopwatch.accounting import _handle_hook

    _handle_hook.remove(accountant)  # what the broken stop left behind, for the next tests
    assert not hasattr(asyncio.events.Handle._run, "__loopwatch__")


def test_at_the_longest_interval_a_hold_just_over_the_threshold_is_seen(
    loop_thread: LoopThread,
) -> None:
    # interval = threshold / 3, the longest allowed: the watchdog still looks inside every
    # hold a little longer than the threshold (with interval = threshold / 2 it could not)
    monitor, log = start_monitor(loop_thread, threshold=0.15, interval=0.05)
    try:
        for _ in range(5):
            time.sleep(0.2)  # the heartbeat runs between two holds
            loop_thread.loop.call_soon_threadsafe(time.sleep, 0.18)
        stalls = log.wait_for(5)
    finally:
        loop_thread.call(monitor.release, loop_thread)
    assert len(stalls) == 5 and all(0.17 <= s.duration <= 0.3 for s in stalls), stalls
