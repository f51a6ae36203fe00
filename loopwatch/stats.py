"""Plain-Python aggregates that the hot path updates without locks.

Each event loop writes only to its own ``Shard`` (one writer thread per field group), and
``metrics`` sums the shards when Prometheus scrapes. That keeps prometheus_client's per-call
locks and label lookups off the request path.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from loopwatch.stall import BACKGROUND_LABEL, SERVER_LABEL
from loopwatch.timeline import Timeline

__all__ = [
    "LAG_BUCKETS",
    "LOOP_TIME_MODES",
    "REQUEST_BUCKETS",
    "STALL_BUCKETS",
    "HistogramData",
    "Shard",
    "StatsBook",
]

LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
STALL_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Code outside any request: its stall counters exist from start-up.
ZERO_KEY = BACKGROUND_LABEL
# The server's own protocol work (loop time only)
SERVER_KEY = SERVER_LABEL

# How a loop's busy time is measured: every callback timed ("exact": the Handle._run hook or
# sys.monitoring), the current task sampled at each watchdog check ("sampled": uvloop before
# 3.12, which under-reads short holds), or not at all ("off").
LOOP_TIME_MODES = ("exact", "sampled", "off")

REQUEST_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class HistogramData:
    """Non-cumulative bucket counts (the last one is +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def merge(self, other: HistogramData) -> None:
        for i, count in enumerate(list(other.counts)):
            self.counts[i] += count
        self.total += other.total

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


# (trace_id, span_id, value, unix time) of one stall: an OpenMetrics exemplar
Exemplar = tuple[str, str, float, float]


def _keep_newer(
    into: dict[tuple[str, str, str], dict[int, Exemplar]],
    source: dict[tuple[str, str, str], dict[int, Exemplar]],
) -> None:
    for key, buckets in source.items():
        mine = into.setdefault(key, {})
        for index, exemplar in buckets.items():
            kept = mine.get(index)
            if kept is None or kept[3] < exemplar[3]:
                mine[index] = exemplar


class WatchedLoop(Protocol):
    """What a scrape or the live page reads of a watched loop besides its shard (a
    ``Monitor``)."""

    threshold: float
    timeline: Timeline

    @property
    def running(self) -> bool: ...

    @property
    def in_flight(self) -> int: ...

    def hold_culprit(self) -> str | None: ...

    def flush_loop_time(self) -> bool | None: ...

    def loop_time_mode(self) -> str: ...

    def current_stall_seconds(self) -> float: ...

    def stall_in_progress(self) -> tuple[tuple[str, str], float] | None: ...

    def threadpool_stats(self) -> tuple[int, int, int] | None: ...


class Shard:
    """The aggregates of one event loop."""

    def __init__(self, lag: HistogramData | None = None) -> None:
        # written by the loop thread (the lag data is the loop's own, shared by its shards)
        self.lag = lag if lag is not None else HistogramData(LAG_BUCKETS)
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str], HistogramData] = {}
        self.in_flight = 0
        # written under StatsBook.stall_lock (stalls are rare; two threads may report them)
        self.stalls: dict[tuple[str, str, str], HistogramData] = {}
        # (method, route, kind) -> bucket index -> the latest traced stall in that bucket
        self.stall_exemplars: dict[tuple[str, str, str], dict[int, Exemplar]] = {}
        # (method, route) -> [stalls, seconds], booked while a stall lasts (not when it ends)
        self.stall_time: dict[tuple[str, str], list[float]] = {}
        # (method, route) -> seconds the loop ran its code (loop time), under stall_lock
        self.busy: dict[tuple[str, str], float] = {}

    def request_started(self) -> None:
        self.in_flight += 1

    def count_request(self, method: str, route: str, status: str, seconds: float) -> None:
        """A request answered (it started with ``request_started``)."""
        self.in_flight -= 1
        key = (method, route, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        hist = self.latency.get((method, route))
        if hist is None:
            hist = self.latency[(method, route)] = HistogramData(REQUEST_BUCKETS)
        hist.observe(seconds)


class Totals:
    """One registry's aggregates summed over its event loops, as a scrape renders them."""

    def __init__(self) -> None:
        self.lag = HistogramData(LAG_BUCKETS)
        self.stalls: dict[tuple[str, str, str], HistogramData] = {}
        self.stall_exemplars: dict[tuple[str, str, str], dict[int, Exemplar]] = {}
        # (method, route) -> [stalls, seconds]; every known route is present, at 0 if need be
        self.stall_time: dict[tuple[str, str], list[float]] = {}
        # (method, route) -> age of the stall in progress, only while one lasts
        self.in_progress: dict[tuple[str, str], float] = {}
        # (method, route) -> loop time; None when no loop is accounted
        self.busy: dict[tuple[str, str], float] | None = None
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str], HistogramData] = {}
        self.in_flight = 0
        self.current_stall = 0.0
        # anyio's default threadpool: (size, busy threads, waiting tasks), when one is known
        self.threadpool: tuple[int, int, int] | None = None
        # running event loops by how their loop time is measured (LOOP_TIME_MODES)
        self.loops: dict[str, int] = dict.fromkeys(LOOP_TIME_MODES, 0)


class StatsBook:
    """All shards that feed one registry; the collector reads them at scrape time."""

    def __init__(self) -> None:
        self.shards: list[Shard] = []
        # the loops that write shards here, for the gauges read at scrape time
        self._loops: weakref.WeakSet[WatchedLoop] = weakref.WeakSet()
        self.request_metrics = False
        # (method, route) pairs the app declares (its route table, read at start-up): their
        # stall counters exist at 0 before the first stall, so rate() counts that one too
        self.declared: set[tuple[str, str]] = {ZERO_KEY}
        self._retired: Shard | None = None
        # multiprocess mode: writes the totals where other workers' scrapes can read them
        self.mirror: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.stall_lock = threading.Lock()

    def new_shard(self, lag: HistogramData | None = None) -> Shard:
        shard = Shard(lag)
        with self._lock:
            self.shards.append(shard)
        return shard

    def use_mirror(self, mirror: Callable[[], None]) -> None:
        """Multiprocess mode: ``mirror`` writes the totals for other workers' scrapes."""
        self.mirror = mirror

    def count_requests(self) -> None:
        """A middleware counts requests into this book: export the request metrics."""
        self.request_metrics = True

    def watch(self, loop: WatchedLoop) -> None:
        """A loop whose gauges (stall in progress, threadpool, loop-time mode) a scrape reads."""
        self._loops.add(loop)

    def loops(self) -> list[WatchedLoop]:
        return list(self._loops)

    def declare(self, keys: Iterable[tuple[str, str]]) -> None:
        """(method, route) pairs whose stall counters exist at 0 from start-up."""
        self.declared.update(keys)

    def sync_mirror(self) -> None:
        """Multiprocess mode: write the totals where other workers' scrapes read them."""
        mirror = self.mirror
        if mirror is not None:
            mirror()

    def busy_total(self, shard: Shard) -> float:
        """Loop time booked so far in one shard."""
        with self.stall_lock:
            return sum(shard.busy.values())

    def retire(self, shard: Shard) -> None:
        """Fold a finished loop's shard into one kept shard, so a test suite that starts a
        loop per request does not grow the list. Under the same lock as ``totals``, so no
        scrape sees the counts missing (a counter going backwards) or twice."""
        with self._lock, self.stall_lock:
            if shard not in self.shards:
                return
            if self._retired is None:
                self._retired = Shard()
                self.shards.append(self._retired)
            keep = self._retired
            for key, n in shard.requests.copy().items():
                keep.requests[key] = keep.requests.get(key, 0) + n
            for lkey, h in shard.latency.copy().items():
                keep.latency.setdefault(lkey, HistogramData(h.bounds)).merge(h)
            for skey, h in shard.stalls.copy().items():
                keep.stalls.setdefault(skey, HistogramData(h.bounds)).merge(h)
            _add_stall_time(keep.stall_time, shard.stall_time)
            _keep_newer(keep.stall_exemplars, shard.stall_exemplars)
            for bkey, seconds in shard.busy.copy().items():
                keep.busy[bkey] = keep.busy.get(bkey, 0.0) + seconds
            keep.lag.merge(shard.lag)
            self.shards.remove(shard)

    def totals(self) -> Totals:
        with self._lock:  # consistent with retire(): every count exactly once
            return self._totals()

    def _totals(self) -> Totals:
        out = Totals()
        accounted = server = False
        for monitor in self.loops():  # book their loop time up to now first
            sees = monitor.flush_loop_time()
            if sees is not None:
                accounted = True
                server = server or sees
        if accounted or any(shard.busy for shard in self.shards):
            out.busy = {}
        seen_lag: set[int] = set()
        for shard in self.shards:
            if id(shard.lag) not in seen_lag:  # a monitor's lag is shared by its shards
                seen_lag.add(id(shard.lag))
                out.lag.merge(shard.lag)
            for rkey, n in shard.requests.copy().items():  # copy(): one C call, no tearing
                out.requests[rkey] = out.requests.get(rkey, 0) + n
            for lkey, h in shard.latency.copy().items():
                out.latency.setdefault(lkey, HistogramData(h.bounds)).merge(h)
            for skey, h in shard.stalls.copy().items():
                out.stalls.setdefault(skey, HistogramData(h.bounds)).merge(h)
            with self.stall_lock:
                _add_stall_time(out.stall_time, shard.stall_time)
                _keep_newer(out.stall_exemplars, shard.stall_exemplars)
                if out.busy is not None:
                    for bkey, seconds in shard.busy.items():
                        out.busy[bkey] = out.busy.get(bkey, 0.0) + seconds
            for method, route, _ in shard.requests.copy():  # a route seen is a route known
                out.stall_time.setdefault((method, route), [0, 0.0])
            out.in_flight += shard.in_flight
        for key in list(self.declared):
            out.stall_time.setdefault(key, [0, 0.0])
        if out.busy is not None:  # the same zero series, and the server's own work
            for key in out.stall_time:  # <routing> too: where a hold before routing goes
                out.busy.setdefault(key, 0.0)
            if server:
                out.busy.setdefault(SERVER_KEY, 0.0)
        for monitor in self.loops():
            if monitor.running:
                out.loops[monitor.loop_time_mode()] += 1
            out.current_stall = max(out.current_stall, monitor.current_stall_seconds())
            live = monitor.stall_in_progress()
            if live is not None:
                key, age = live
                out.in_progress[key] = max(out.in_progress.get(key, 0.0), age)
            pool = monitor.threadpool_stats()
            if pool is not None:
                prev = out.threadpool or (0, 0, 0)
                out.threadpool = (prev[0] + pool[0], prev[1] + pool[1], prev[2] + pool[2])
        return out

    def observe_stall(
        self,
        shard: Shard,
        method: str,
        route: str,
        kind: str,
        seconds: float,
        trace: tuple[str, str, float] | None = None,
    ) -> None:
        """One stall; ``trace``: (trace_id, span_id, unix end time) of its culprit, kept as
        the exemplar of the bucket it falls in."""
        with self.stall_lock:
            key = (method, route, kind)
            hist = shard.stalls.get(key)
            if hist is None:
                hist = shard.stalls[key] = HistogramData(STALL_BUCKETS)
            hist.observe(seconds)
            if trace is not None:
                index = bisect.bisect_left(hist.bounds, seconds)
                exemplar = (trace[0], trace[1], seconds, trace[2])
                shard.stall_exemplars.setdefault(key, {})[index] = exemplar

    def book_stall_time(
        self, shard: Shard, method: str, route: str, stalls: int, seconds: float
    ) -> None:
        """Count stalls and seconds held as they happen (the watchdog calls this every check
        while a stall lasts), so rate() shows a freeze while it lasts, never as a spike."""
        with self.stall_lock:
            entry = shard.stall_time.get((method, route))
            if entry is None:
                entry = shard.stall_time[(method, route)] = [0, 0.0]
            entry[0] += stalls
            entry[1] += seconds

    def book_busy(self, shard: Shard, key: tuple[str, str], seconds: float) -> None:
        """Loop time of (method, route), booked by the watchdog or a scrape."""
        with self.stall_lock:
            shard.busy[key] = shard.busy.get(key, 0.0) + seconds


def _add_stall_time(
    into: dict[tuple[str, str], list[float]], source: dict[tuple[str, str], list[float]]
) -> None:
    for key, (stalls, seconds) in source.items():
        entry = into.setdefault(key, [0, 0.0])
        entry[0] += stalls
        entry[1] += seconds
