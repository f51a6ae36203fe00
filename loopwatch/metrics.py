"""The one module that imports prometheus_client: a collector that renders loopwatch's
aggregates at scrape time.

The hot path never touches prometheus_client: the middleware and the watchdog update plain
Python aggregates (``stats``), one shard per event loop, and ``LoopwatchCollector.collect``
sums them when a scrape arrives.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from loopwatch.config import ConfigError
from loopwatch.stats import HistogramData, StatsBook

__all__ = ["LoopwatchCollector", "book_for", "resolve_registry"]

_books: weakref.WeakKeyDictionary[CollectorRegistry, StatsBook] = weakref.WeakKeyDictionary()
_books_lock = threading.Lock()


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
            registry.register(LoopwatchCollector(book))
            _books[registry] = book
        return book


def _buckets(bounds: Iterable[float], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        out.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
    out.append(("+Inf", running + counts[-1]))
    return out


def _merge(
    into: dict[tuple[str, ...], HistogramData], key: tuple[str, ...], h: HistogramData
) -> None:
    counts = list(h.counts)  # one C-level copy: consistent against the writer thread
    total = h.total
    merged = into.get(key)
    if merged is None:
        merged = into[key] = HistogramData(h.bounds)
    for i, c in enumerate(counts):
        merged.counts[i] += c
    merged.total += total


class LoopwatchCollector(Collector):
    """Renders one ``StatsBook`` (all event loops writing for one registry)."""

    def __init__(self, book: StatsBook) -> None:
        self.book = book

    def describe(self) -> list[Metric]:
        return list(self._families(empty=True))

    def collect(self) -> list[Metric]:
        return list(self._families(empty=False))

    def _families(self, empty: bool) -> Iterator[Metric]:
        book = self.book
        shards = [] if empty else book.snapshot()
        monitors = [] if empty else list(book.monitors)

        lag = HistogramMetricFamily(
            "loopwatch_event_loop_lag_seconds",
            "How late each event loop heartbeat woke up, in seconds.",
        )
        merged: dict[tuple[str, ...], HistogramData] = {}
        seen_lag: set[int] = set()
        for shard in shards:
            if id(shard.lag) not in seen_lag:  # a monitor's lag is shared by its shards
                seen_lag.add(id(shard.lag))
                _merge(merged, (), shard.lag)
        if () in merged:
            lag.add_metric([], _buckets(merged[()].bounds, merged[()].counts), merged[()].total)
        yield lag

        stalls = HistogramMetricFamily(
            "loopwatch_stall_duration_seconds",
            "Event loop stalls by the route whose code held the loop; _count is stalls, "
            "_sum is seconds lost.",
            labels=["method", "route", "kind"],
        )
        merged = {}
        for shard in shards:
            for skey, h in shard.stalls.copy().items():
                _merge(merged, skey, h)
        for mkey, h in sorted(merged.items()):
            stalls.add_metric(list(mkey), _buckets(h.bounds, h.counts), h.total)
        yield stalls

        current = GaugeMetricFamily(
            "loopwatch_current_stall_seconds",
            "Age of the event loop stall in progress, 0 when the loop is responsive.",
        )
        if not empty:
            current.add_metric([], max((m.current_stall_seconds() for m in monitors), default=0.0))
        yield current

        if not (book.request_metrics or empty):
            return
        requests = CounterMetricFamily(
            "loopwatch_requests",
            "Requests served, by route template and status.",
            labels=["method", "route", "status"],
        )
        totals: dict[tuple[str, str, str], int] = {}
        for shard in shards:
            for rkey, n in shard.requests.copy().items():
                totals[rkey] = totals.get(rkey, 0) + n
        for rkey, n in sorted(totals.items()):
            requests.add_metric(list(rkey), n)
        yield requests

        latency = HistogramMetricFamily(
            "loopwatch_request_duration_seconds",
            "Request latency as the client saw it, by route template.",
            labels=["method", "route"],
        )
        merged = {}
        for shard in shards:
            for lkey, h in shard.latency.copy().items():
                _merge(merged, lkey, h)
        for mkey, h in sorted(merged.items()):
            latency.add_metric(list(mkey), _buckets(h.bounds, h.counts), h.total)
        yield latency

        in_flight = GaugeMetricFamily(
            "loopwatch_requests_in_flight", "Requests being served right now."
        )
        if not empty:
            in_flight.add_metric([], sum(shard.in_flight for shard in shards))
        yield in_flight
