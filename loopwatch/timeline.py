"""The last minutes of one event loop, one point per second, for the live page.

The watchdog thread calls ``Timeline.tick`` at every check; about once a second it appends a
point: the heartbeat lag's p99 over that second (from the lag histogram's bucket deltas, as
Prometheus' ``histogram_quantile`` would estimate it), the longest heartbeat delay the
watchdog saw in that second (a stall in progress shows here while it lasts: the loop runs no
heartbeat to observe), and the loop's utilization (seconds of loop time booked in that second
per second, when loop time is accounted). Bounded: ``KEEP`` points.

Standard library only.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["KEEP", "Point", "Timeline", "quantile"]

KEEP = 600  # ten minutes


class Point(NamedTuple):
    """One second of one loop; ``t`` is wall-clock time (``time.time()``) at its end."""

    t: float
    lag_p99: float
    lag_max: float
    utilization: float | None


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float:
    """``histogram_quantile`` over non-cumulative ``counts`` (the last one is +Inf): linear
    inside the bucket, the highest finite bound for the +Inf bucket, 0 with no observation."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    running = 0
    for i, count in enumerate(counts):
        if running + count >= rank and count > 0:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - running) / count
        running += count
    return float(bounds[-1])


class Timeline:
    """Per-second points of one loop, written by its watchdog thread, read by any thread."""

    def __init__(self, keep: int = KEEP, *, wall: float | None = None) -> None:
        self._points: collections.deque[Point] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._next = 0.0
        self._start = 0.0
        self._counts: list[int] | None = None
        self._busy: float | None = None
        self._peak = 0.0
        self._wall = wall  # tests: a fixed wall clock offset

    def points(self, since: float = 0.0) -> list[Point]:
        with self._lock:
            return [p for p in self._points if p.t > since]

    def tick(
        self,
        now: float,
        late: float,
        overdue: bool,
        lag_bounds: Sequence[float],
        lag_counts: Sequence[int],
        busy: float | None,
    ) -> None:
        """One watchdog check: the heartbeat is ``late`` seconds old (``overdue``: the loop
        is held right now); the lag histogram's counts and the loop time booked so far."""
        if overdue and late > self._peak:
            self._peak = late
        if now < self._next:
            return
        counts = list(lag_counts)
        previous, self._counts = self._counts, counts
        previous_busy, self._busy = self._busy, busy
        elapsed, self._start = now - self._start, now
        self._next = now + 1.0
        if previous is None:  # the first call only sets the baseline
            return
        delta = [b - a for a, b in zip(previous, counts, strict=True)]
        p99 = quantile(0.99, lag_bounds, delta)
        utilization = None
        if busy is not None and previous_busy is not None and elapsed > 0:
            utilization = min(1.0, max(0.0, (busy - previous_busy) / elapsed))
        wall = time.time() if self._wall is None else self._wall + now
        point = Point(round(wall, 3), p99, max(self._peak, p99), utilization)
        self._peak = 0.0
        with self._lock:
            self._points.append(point)
