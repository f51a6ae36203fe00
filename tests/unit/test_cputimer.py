"""The CPU-time timer the loop profile samples with (``loopwatch.cputimer``), run for real: a
POSIX timer on this (the main) thread's CPU clock, its SIGURG handler, and what it leaves."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from types import FrameType

import pytest

from loopwatch import Settings, cputimer
from loopwatch.monitor import Monitor
from loopwatch.profile import PROFILE, parse_collapsed
from tests.helpers import burn_first, burn_second

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="timer_create: Linux")


@pytest.fixture(autouse=True)
def _no_timer_left() -> Iterator[None]:
    yield
    assert cputimer._armed is None
    assert signal.getsignal(signal.SIGURG) == signal.SIG_DFL


def test_the_timer_samples_the_thread_where_it_computes_in_proportion() -> None:
    # two equal functions in 1 ms slices, with sleeps between (bursts shorter than a tick):
    # each gets about half of the samples and of the CPU seconds they stand for
    seen: Counter[str] = Counter()
    cpu: Counter[str] = Counter()

    def handler(frame: FrameType, spent: float) -> None:
        seen[frame.f_code.co_name] += 1
        cpu[frame.f_code.co_name] += spent

    timer = cputimer.arm(handler)
    assert timer is not None and timer.armed
    assert signal.getsignal(signal.SIGURG) is not signal.SIG_DFL
    started = time.thread_time()
    try:
        lengths = random.Random(18)  # varying: see the monitor's test below
        for _ in range(600):
            seconds = lengths.uniform(0.0005, 0.0015)
            burn_first(seconds)
            burn_second(seconds)
            time.sleep(0.0005)
    finally:
        timer.disarm()
    used = time.thread_time() - started
    first, second = seen["burn_first"], seen["burn_second"]
    assert first + second >= 60, seen  # one per tick of 1-10 ms, over 1.2 s of CPU
    assert 0.35 <= first / (first + second) <= 0.65, seen
    # the samples stand for the CPU the thread used, all of it
    assert sum(cpu.values()) == pytest.approx(used, rel=0.2)
    assert not timer.armed


def test_a_call_that_keeps_the_gil_is_sampled_at_its_line_for_all_its_cpu() -> None:
    # one C call: the handler runs where the call checks for signals (CPython's long
    # arithmetic does), or right after it, on the line that made it; its samples stand for
    # all of the call's CPU
    import math

    here = sys._getframe().f_code
    got: list[tuple[int, float]] = []

    def handler(frame: FrameType, spent: float) -> None:
        if frame.f_code is here:
            got.append((frame.f_lineno, spent))

    timer = cputimer.arm(handler)
    assert timer is not None
    try:
        began = time.thread_time()
        line = sys._getframe().f_lineno + 1
        math.factorial(120_000).bit_length()
        used = time.thread_time() - began
        time.sleep(0)
    finally:
        timer.disarm()
    assert got, "no sample of the call"
    assert {ln for ln, _ in got} <= {line, line + 1}, (line, got)
    assert sum(spent for _, spent in got) >= 0.8 * used, (used, got)


def test_a_sigurg_handler_of_the_apps_is_left_alone() -> None:
    calls: list[int] = []

    def apps(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    signal.signal(signal.SIGURG, apps)
    try:
        assert cputimer.arm(lambda frame, spent: None) is None
        assert signal.getsignal(signal.SIGURG) is apps
    finally:
        signal.signal(signal.SIGURG, signal.SIG_DFL)


def test_off_the_main_thread_and_twice_it_is_not_armed() -> None:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(cputimer.arm(lambda f, s: None)))
    thread.start()
    thread.join()
    assert result == [None]
    timer = cputimer.arm(lambda frame, spent: None)
    try:
        assert timer is not None
        assert cputimer.arm(lambda frame, spent: None) is None  # one per process
    finally:
        assert timer is not None
        timer.disarm()


def test_a_failing_handler_is_logged_once_stops_and_never_reaches_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def handler(frame: FrameType, spent: float) -> None:
        raise RuntimeError("boom")

    timer = cputimer.arm(handler)
    assert timer is not None
    with caplog.at_level(logging.ERROR, logger="loopwatch"):
        burn_first(0.2)  # no exception here: the app's code runs on
        burn_first(0.1)
    assert not timer.armed
    assert [r.getMessage() for r in caplog.records].count(
        "loopwatch: the profile's CPU-time sample failed; sampling stops"
    ) == 1


def _child_report(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put((cputimer._armed is None, signal.getsignal(signal.SIGURG) == signal.SIG_DFL))


def test_a_forked_child_has_no_timer_and_no_handler() -> None:
    timer = cputimer.arm(lambda frame, spent: None)
    assert timer is not None
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child_report, args=(queue,))
        child.start()
        assert queue.get(timeout=20) == (True, True)
        child.join(20)
    finally:
        timer.disarm()


def test_a_monitor_on_the_main_thread_profiles_by_timer_and_leaves_nothing() -> None:
    # asyncio.run on the main thread, as a worker or a script runs its loop: the profile's
    # samples come from the timer, and stopping restores SIGURG's default
    PROFILE.clear()
    settings = Settings.resolve(env={})

    async def main() -> bool:
        monitor = Monitor(asyncio.get_running_loop(), settings)
        monitor.acquire("test")
        try:
            sampler = monitor.pipeline._sampler
            armed = sampler is not None and sampler.self_sampling
            # slices of varying length: a step that repeats at exactly the scheduler tick
            # (2 + 2 ms against 4 ms) is sampled at one phase of it (seen: 75/25)
            lengths = random.Random(18)
            for _ in range(100):
                seconds = lengths.uniform(0.001, 0.003)
                burn_first(seconds)
                burn_second(seconds)
                await asyncio.sleep(0)
            await asyncio.sleep(0.3)  # the watchdog stores the samples
            return armed
        finally:
            monitor.release("test")

    try:
        assert asyncio.run(main())
        stacks = parse_collapsed(PROFILE.collapsed())
        first = sum(c for s, c in stacks if "burn_first" in s[-1])
        second = sum(c for s, c in stacks if "burn_second" in s[-1])
        assert first + second >= 200, stacks  # ms: about 400 ms of CPU was burned
        assert 0.3 <= first / (first + second) <= 0.7, (first, second)
    finally:
        PROFILE.clear()


def test_the_blocked_probe_tells_a_sleep_from_a_gil_or_lock_wait_and_from_running() -> None:
    # the watchdog samples the loop thread off its CPU only asleep in a call: not waiting for
    # the GIL (a futex, as a lock's wait), where its frame is wherever it let the GIL go
    from loopwatch.detect import _thread_blocked

    lock = threading.Lock()
    lock.acquire()
    stop = threading.Event()
    ids: dict[str, int] = {}

    def sleeper() -> None:
        ids["sleep"] = threading.get_native_id()
        stop.wait(5)  # a futex too: a Python-level wait is no sleep in a call
        time.sleep(0)

    def napper() -> None:
        ids["nap"] = threading.get_native_id()
        time.sleep(2)

    def locker() -> None:
        ids["lock"] = threading.get_native_id()
        lock.acquire(timeout=5)

    threads = [threading.Thread(target=f, daemon=True) for f in (sleeper, napper, locker)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    try:
        probes = {name: _thread_blocked(native) for name, native in ids.items()}
        if any(p is None for p in probes.values()):
            pytest.skip("no /proc/<pid>/task/<tid>/syscall here")
        assert probes["nap"]() is True  # type: ignore[misc]
        assert probes["lock"]() is False  # type: ignore[misc]
        assert probes["sleep"]() is False  # type: ignore[misc]
    finally:
        stop.set()
        lock.release()


def test_the_handler_takes_no_lock_the_code_it_interrupts_may_hold() -> None:
    # The handler runs on the loop thread inside whatever it runs: here, code that holds the
    # route tables' lock (old Starlette's route lookup; a collection ran inside it). Reading
    # the request's route in the handler took that lock again: a uvicorn soak server froze
    # for good (py-spy: the main thread in _legacy_template under the handler, under a gc
    # callback, under _legacy_template). The handler keeps references; the watchdog names.
    from types import SimpleNamespace

    from loopwatch import routes
    from loopwatch.detect import Detector
    from loopwatch.frames import CodeFilter
    from loopwatch.profile import LoopSampler, ProfileStore, route_label
    from loopwatch.requests import RequestRecord

    class Router:  # a router not seen yet: its table is built, and stored under the lock
        def __init__(self) -> None:
            self.routes: list[object] = []

    def endpoint() -> None: ...

    record = RequestRecord("GET", {"endpoint": endpoint, "router": Router()}, "")
    accountant = SimpleNamespace(exact=True, start=1.0, owner=record, bound=None)
    loop = asyncio.new_event_loop()
    detector = Detector(
        threshold=0.1, interval=0.01, long_stall=10.0, clock=time.monotonic,
        frames=dict, code_filter=CodeFilter(), attribute=lambda: None,  # type: ignore[arg-type,return-value]
        in_flight=lambda: 0, events=None,  # type: ignore[arg-type]
    )  # fmt: skip
    store = ProfileStore()
    sampler = LoopSampler(
        loop, detector, lambda: accountant, lambda: None, lambda task: None,  # type: ignore[arg-type,return-value]
        store=store,
    )  # fmt: skip
    here = sys._getframe()
    done = threading.Event()
    try:
        with routes._tables_lock:
            thread = threading.Thread(target=lambda: (sampler._on_tick(here, 0.004), done.set()))
            thread.start()
            assert done.wait(5), "the handler waited for a lock the interrupted code holds"
        thread.join(5)
        sampler._store_ticks()  # the watchdog names it, the lock free again
        [(stack, weight)] = parse_collapsed(store.collapsed())
        assert stack[0] == route_label("GET", record.owner_route()) and weight == 4
        assert "test_the_handler_takes_no_lock" in stack[-1]
    finally:
        loop.close()


def test_the_samples_line_read_from_the_bytecode_offset_is_the_frames_line() -> None:
    # The handler keeps each frame's f_lasti (f_lineno scans the line table, at every tick);
    # the watchdog turns it into the line: the same line, in every frame of a deep stack of
    # plain calls, a comprehension and a coroutine
    from loopwatch.frames import line_at

    seen: list[tuple[str, int, int]] = []

    def look() -> None:
        frame: FrameType | None = sys._getframe()
        while frame is not None:
            lineno, lasti = frame.f_lineno, frame.f_lasti  # one instant, for this frame too
            code = frame.f_code
            seen.append((code.co_name, lineno or code.co_firstlineno, line_at(code, lasti)))
            frame = frame.f_back

    def deep(k: int) -> None:
        if k:
            [deep(k - 1) for _ in range(1)]
        else:
            look()

    async def main() -> None:
        await asyncio.sleep(0)
        deep(4)

    asyncio.run(main())
    assert len(seen) > 10
    assert [(name, line) for name, line, _ in seen] == [(name, got) for name, _, got in seen]
