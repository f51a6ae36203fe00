"""The one module that imports prometheus_client: a collector that renders loopwatch's
aggregates at scrape time, and the multiprocess mirror.

The hot path never touches prometheus_client: the middleware and the watchdog update plain
Python aggregates (``stats``), one shard per event loop, and ``LoopwatchCollector.collect``
sums them when a scrape arrives. With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker
processes), each process's watchdog also mirrors its totals into prometheus_client's
multiprocess files about once a second, and scrapes render the aggregate of all workers; the
same call publishes its loops, stalls and profile for the live page (``fleet``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from loopwatch import fleet
from loopwatch.config import ConfigError, multiprocess_dir
from loopwatch.stats import (
    LAG_BUCKETS,
    REQUEST_BUCKETS,
    STALL_BUCKETS,
    HistogramData,
    StatsBook,
    Totals,
)
from loopwatch.stats import Exemplar as TraceExemplar

__all__ = [
    "LoopwatchCollector",
    "book_for",
    "resolve_registry",
    "scrape_registry",
]

_books: weakref.WeakKeyDictionary[CollectorRegistry, StatsBook] = weakref.WeakKeyDictionary()
_books_lock = threading.Lock()

HELP = {
    "lag": "How late each event loop heartbeat woke up, in seconds.",
    "stalls": "Event loop stalls by the route whose code held the loop; _count is stalls, "
    "_sum is seconds lost.",
    "current": "Age of the event loop stall in progress, 0 when the loop is responsive.",
    "stall_seconds": "Seconds the event loop was held by stalls, by the route whose code held "
    "it; grows while a stall lasts.",
    "stall_count": "Event loop stalls by the route whose code held the loop, counted as the "
    "hold crosses the threshold.",
    "busy": "Seconds the event loop thread ran code, by the route of the request it ran for "
    "(<task NAME>: a task no request started, by its coroutine; <background>: other code "
    "outside requests; <server>: the server's own protocol work).",
    "loops": "Event loops watched right now, by how their loop time is measured (exact: every "
    "callback timed; sampled: uvloop before Python 3.12, reads short holds low; off).",
    "in_progress": "Age of the event loop stall in progress, by the route holding the loop; "
    "present only while a stall lasts.",
    "requests": "Requests served, by route template and status.",
    "latency": "Request latency as the client saw it, by route template.",
    "in_flight": "Requests being served right now.",
    "pool_size": "Threads anyio's default threadpool may run (def endpoints, run_in_threadpool).",
    "pool_busy": "Threadpool threads busy right now.",
    "pool_waiting": "Tasks waiting for a free threadpool thread: def endpoints queueing.",
}


# The threadpool gauges, in the order of Totals.threadpool: (name suffix, HELP key).
_POOL_GAUGES = (
    ("size", "pool_size"),
    ("busy_threads", "pool_busy"),
    ("waiting_tasks", "pool_waiting"),
)


def resolve_registry(registry: object) -> CollectorRegistry:
    """``None`` means prometheus_client's default registry; anything else must be one."""
    if registry is None:
        return REGISTRY
    if not isinstance(registry, CollectorRegistry):
        raise ConfigError(
            "registry", registry, "argument", "a prometheus_client CollectorRegistry or None"
        )
    return registry


def book_for(registry: CollectorRegistry | None) -> StatsBook:
    """The aggregates feeding ``registry``; registers one collector per registry, once, so
    any number of middleware instances (an app built per test) share it."""
    registry = REGISTRY if registry is None else registry
    with _books_lock:
        book = _books.get(registry)
        if book is None:
            book = StatsBook()
            directory = multiprocess_dir()
            if directory:
                book.use_mirror(_mirror(book, directory))
            else:
                registry.register(LoopwatchCollector(book))
            _books[registry] = book
        return book


def _mirror(book: StatsBook, directory: str) -> Callable[[], None]:
    """Multiprocess mode: the totals into prometheus_client's files, and this worker's loops,
    stalls and profile into the fleet's (``fleet``), for the worker that serves the page."""
    mirror = _MultiprocessMirror(book)
    publisher = fleet.publisher_for(directory)
    publisher.add(book)

    def sync() -> None:
        try:
            mirror.sync()
        finally:
            publisher.publish()  # logs its own failure, once

    return sync


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What a scrape renders: the registry, or in multiprocess mode all workers' files."""
    if not multiprocess_dir():
        return registry
    from prometheus_client import multiprocess

    book = _books.get(registry)
    if book is not None:
        book.sync_mirror()  # this worker's own figures, fresh
    aggregate = CollectorRegistry()
    multiprocess.MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
    return aggregate


def _buckets(
    bounds: Iterable[float], counts: list[int], exemplars: dict[int, TraceExemplar] | None = None
) -> list[Any]:
    """Cumulative (le, count) pairs; with ``exemplars``, (le, count, Exemplar) where a traced
    stall fell in that bucket (OpenMetrics renders them, the text format drops them)."""
    out: list[Any] = []
    running = 0
    for index, bound in enumerate([*bounds, float("inf")]):
        running += counts[index]
        le = "+Inf" if index == len(counts) - 1 else floatToGoString(bound)  # type: ignore[no-untyped-call]
        found = exemplars.get(index) if exemplars else None
        if found is None:
            out.append((le, running))
        else:
            trace_id, span_id, value, at = found
            out.append(
                (le, running, Exemplar({"trace_id": trace_id, "span_id": span_id}, value, at))
            )
    return out


class LoopwatchCollector(Collector):
    """Renders one ``StatsBook`` (all event loops writing for one registry)."""

    def __init__(self, book: StatsBook) -> None:
        self.book = book

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> list[Metric]:
        return list(self._families(self.book.totals()))

    def _families(self, t: Totals | None) -> Iterator[Metric]:
        lag = HistogramMetricFamily("loopwatch_event_loop_lag_seconds", HELP["lag"])
        if t is not None:
            lag.add_metric([], _buckets(t.lag.bounds, t.lag.counts), t.lag.total)
        yield lag

        stalls = HistogramMetricFamily(
            "loopwatch_stall_duration_seconds", HELP["stalls"], labels=["method", "route", "kind"]
        )
        for skey, h in sorted(t.stalls.items()) if t else ():
            exemplars = t.stall_exemplars.get(skey) if t else None
            stalls.add_metric(list(skey), _buckets(h.bounds, h.counts, exemplars), h.total)
        yield stalls

        stall_seconds = CounterMetricFamily(
            "loopwatch_stall_seconds", HELP["stall_seconds"], labels=["method", "route"]
        )
        stall_count = CounterMetricFamily(
            "loopwatch_stalls", HELP["stall_count"], labels=["method", "route"]
        )
        for tkey, (count, seconds) in sorted(t.stall_time.items()) if t else ():
            stall_seconds.add_metric(list(tkey), seconds)
            stall_count.add_metric(list(tkey), count)
        yield stall_seconds
        yield stall_count

        in_progress = GaugeMetricFamily(
            "loopwatch_stall_in_progress_seconds", HELP["in_progress"], labels=["method", "route"]
        )
        for pkey, age in sorted(t.in_progress.items()) if t else ():
            in_progress.add_metric(list(pkey), age)
        yield in_progress

        current = GaugeMetricFamily("loopwatch_current_stall_seconds", HELP["current"])
        if t is not None:
            current.add_metric([], t.current_stall)
        yield current

        loops = GaugeMetricFamily("loopwatch_event_loops", HELP["loops"], labels=["loop_time"])
        for mode, count in t.loops.items() if t else ():
            loops.add_metric([mode], count)
        yield loops

        if t is None or t.busy is not None:
            busy = CounterMetricFamily(
                "loopwatch_event_loop_busy_seconds", HELP["busy"], labels=["method", "route"]
            )
            for bkey, seconds in sorted(t.busy.items()) if t and t.busy else ():
                busy.add_metric(list(bkey), seconds)
            yield busy

        if t is None or t.threadpool is not None:
            pool = t.threadpool if t is not None else None
            for index, (name, help_key) in enumerate(_POOL_GAUGES):
                family = GaugeMetricFamily(f"loopwatch_threadpool_{name}", HELP[help_key])
                if pool is not None:
                    family.add_metric([], pool[index])
                yield family

        if t is not None and not self.book.request_metrics:
            return
        requests = CounterMetricFamily(
            "loopwatch_requests", HELP["requests"], labels=["method", "route", "status"]
        )
        for rkey, n in sorted(t.requests.items()) if t else ():
            requests.add_metric(list(rkey), n)
        yield requests

        latency = HistogramMetricFamily(
            "loopwatch_request_duration_seconds", HELP["latency"], labels=["method", "route"]
        )
        for lkey, h in sorted(t.latency.items()) if t else ():
            latency.add_metric(list(lkey), _buckets(h.bounds, h.counts), h.total)
        yield latency

        in_flight = GaugeMetricFamily("loopwatch_requests_in_flight", HELP["in_flight"])
        if t is not None:
            in_flight.add_metric([], t.in_flight)
        yield in_flight


class _MultiprocessMirror:
    """Writes one process's totals into prometheus_client's multiprocess files.

    The hot path stays lock-free; this runs on the watchdog thread about once a second and
    before a scrape, and sets absolute values (counters only grow, so setting is safe).
    Gauges use ``livesum`` (in flight, threadpool, event loops) and ``livemax`` (the stall in
    progress): a dead worker's gauges disappear once ``multiprocess.mark_process_dead(pid)``
    runs.
    """

    def __init__(self, book: StatsBook) -> None:
        self.book = book
        self._lock = threading.Lock()
        no_registry: Any = None  # written to the mmap files; scraped via MultiProcessCollector
        self.lag = Histogram(
            "loopwatch_event_loop_lag_seconds", HELP["lag"], buckets=LAG_BUCKETS,
            registry=no_registry,
        )  # fmt: skip
        self.stalls = Histogram(
            "loopwatch_stall_duration_seconds", HELP["stalls"], ["method", "route", "kind"],
            buckets=STALL_BUCKETS, registry=no_registry,
        )  # fmt: skip
        self.stall_seconds = Counter(
            "loopwatch_stall_seconds", HELP["stall_seconds"], ["method", "route"],
            registry=no_registry,
        )  # fmt: skip
        self.stall_count = Counter(
            "loopwatch_stalls", HELP["stall_count"], ["method", "route"], registry=no_registry
        )
        # a file-backed gauge cannot drop a series: a finished stall's stays, at 0
        self.in_progress = Gauge(
            "loopwatch_stall_in_progress_seconds", HELP["in_progress"], ["method", "route"],
            multiprocess_mode="livemax", registry=no_registry,
        )  # fmt: skip
        self._in_progress_keys: set[tuple[str, str]] = set()
        self.busy = Counter(
            "loopwatch_event_loop_busy_seconds", HELP["busy"], ["method", "route"],
            registry=no_registry,
        )  # fmt: skip
        self.current = Gauge(
            "loopwatch_current_stall_seconds", HELP["current"], multiprocess_mode="livemax",
            registry=no_registry,
        )  # fmt: skip
        # each worker's running loops: the divisor that turns summed loop time into a share
        self.loops = Gauge(
            "loopwatch_event_loops", HELP["loops"], ["loop_time"], multiprocess_mode="livesum",
            registry=no_registry,
        )  # fmt: skip
        self.requests = Counter(
            "loopwatch_requests", HELP["requests"], ["method", "route", "status"],
            registry=no_registry,
        )  # fmt: skip
        self.latency = Histogram(
            "loopwatch_request_duration_seconds", HELP["latency"], ["method", "route"],
            buckets=REQUEST_BUCKETS, registry=no_registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "loopwatch_requests_in_flight", HELP["in_flight"], multiprocess_mode="livesum",
            registry=no_registry,
        )  # fmt: skip
        self.pool = [
            Gauge(f"loopwatch_threadpool_{n}", HELP[h], multiprocess_mode="livesum",
                  registry=no_registry)
            for n, h in _POOL_GAUGES
        ]  # fmt: skip

    @staticmethod
    def _set_histogram(child: Any, h: HistogramData) -> None:
        for value, count in zip(child._buckets, h.counts, strict=True):
            value.set(count)
        child._sum.set(h.total)

    def sync(self) -> None:
        with self._lock:
            t = self.book.totals()
            self._set_histogram(self.lag, t.lag)
            for skey, h in t.stalls.items():
                self._set_histogram(self.stalls.labels(*skey), h)
            for tkey, (count, seconds) in t.stall_time.items():
                self.stall_count.labels(*tkey)._value.set(count)
                self.stall_seconds.labels(*tkey)._value.set(seconds)
            for pkey in self._in_progress_keys - t.in_progress.keys():
                self.in_progress.labels(*pkey).set(0)
            for pkey, age in t.in_progress.items():
                self.in_progress.labels(*pkey).set(age)
            self._in_progress_keys = set(t.in_progress)
            for bkey, seconds in (t.busy or {}).items():
                self.busy.labels(*bkey)._value.set(seconds)
            self.current.set(t.current_stall)
            for mode, count in t.loops.items():
                self.loops.labels(mode).set(count)
            if self.book.request_metrics:
                for rkey, n in t.requests.items():
                    self.requests.labels(*rkey)._value.set(n)
                for lkey, h in t.latency.items():
                    self._set_histogram(self.latency.labels(*lkey), h)
                self.in_flight.set(t.in_flight)
            if t.threadpool is not None:
                for gauge, value in zip(self.pool, t.threadpool, strict=True):
                    gauge.set(value)
