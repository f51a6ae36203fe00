"""Charging: each stall, and each second of loop time, goes to the test (phase, fixture) that
owns the loop, with a verdict: failed, allowed (``allow_blocking``, ``allow=True``), below
the test's threshold, or ``gc`` (the garbage collector made it: reported, failed only with
``--loopwatch-gc=fail``)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from loopwatch.pytest_plugin.loops import Watch, charges_to_test
from loopwatch.pytest_plugin.records import Context, Record
from loopwatch.stall import Stall

__all__ = ["Charges"]


class Charges:
    """Every stall of this process, charged; loop time per test. Written from the watchdog
    threads and the loops' threads, read by pytest's."""

    def __init__(
        self,
        threshold: float,
        worker: str | None,
        context: Callable[[], Context | None],
        gc_fails: bool = False,
    ) -> None:
        self.threshold = threshold
        self.gc_fails = gc_fails  # else a stall the collector made is reported, not failed
        self.worker = worker  # the pytest-xdist worker, if any
        self._context = context
        self._lock = threading.Lock()
        self.records: list[Record] = []
        self._windows: list[list[float]] = []
        self.failed_nodeids: set[str] = set()
        # nodeid -> "METHOD ROUTE" -> loop seconds booked while the test ran (every phase)
        self.loop_time: dict[str, dict[str, float]] = {}

    def open_window(self) -> list[float]:
        """An ``allow_blocking()`` block: [start, end], its end set when it closes."""
        window = [time.time(), math.inf]
        with self._lock:
            self._windows.append(window)
        return window

    def _uncovered(self, start: float, end: float) -> float:
        """Seconds of [start, end] outside every allow_blocking() window."""
        with self._lock:
            spans = sorted((max(a, start), min(b, end)) for a, b in self._windows)
        covered, reach = 0.0, start
        for a, b in spans:
            a = max(a, reach)
            if b > a:
                covered += b - a
                reach = b
        return (end - start) - covered

    def charge(self, watch: Watch, stall: Stall) -> None:
        owner, now = watch.owner, self._context()
        if watch.on_main:
            context = owner  # a loop on pytest's thread runs within one phase
        elif charges_to_test(watch, now):
            context = now
        else:
            context = None
        threshold = context.threshold if context is not None else self.threshold
        if stall.duration < threshold:
            verdict = "below-threshold"
        elif (context is not None and context.allow) or self._uncovered(
            stall.started_at, stall.started_at + stall.duration
        ) < threshold:
            verdict = "allowed"
        elif stall.kind == "gc" and not self.gc_fails:
            verdict = "gc"
        else:
            verdict = "failed"
        record = Record(
            stall, context, watch.thread_name, watch.owner_text(), threshold, verdict, self.worker
        )
        with self._lock:
            self.records.append(record)

    def charge_busy(self, watch: Watch, key: tuple[str, str], seconds: float) -> None:
        """Loop time booked by a watched loop's monitor, to the test that owns it (as
        stalls are charged); time of loops owned by no test is not counted."""
        now = self._context()
        if watch.on_main:
            context = watch.owner
        elif charges_to_test(watch, now):
            context = now
        else:
            return
        if context is None:
            return
        method, route = key
        label = f"{method} {route}" if method != "-" else route
        with self._lock:
            routes = self.loop_time.setdefault(context.nodeid, {})
            routes[label] = routes.get(label, 0.0) + seconds

    def test_started(self, nodeid: str) -> None:
        with self._lock:
            self.loop_time.setdefault(nodeid, {})

    def failures(self, nodeid: str, phase: str) -> list[Record]:
        """The stalls that fail this test's phase (the phase is marked failed)."""
        with self._lock:
            found = [
                r
                for r in self.records
                if r.verdict == "failed"
                and r.context is not None
                and r.context.nodeid == nodeid
                and r.context.phase == phase
            ]
            if found:
                self.failed_nodeids.add(nodeid)
            return found

    def snapshot(self) -> tuple[list[Record], list[str], dict[str, dict[str, float]]]:
        """(records, failed tests, loop time), copied."""
        with self._lock:
            return (
                list(self.records),
                sorted(self.failed_nodeids),
                {nodeid: dict(routes) for nodeid, routes in self.loop_time.items()},
            )
