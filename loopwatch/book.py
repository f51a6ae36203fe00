"""Book: the one place that writes a loop's figures, from one record per hold.

Every registry a loop reports to (``StatsBook``) gets a ``Shard`` of this loop's aggregates.
The ``Ledger`` writes them all, once per event:

- a stall while it lasts: its count and seconds under its owner (``book_live``), so
  ``rate()`` shows a freeze as it happens, and the stall in progress;
- a stall once closed: the ring, its duration histogram, and the seconds not booked live
  (``book_stall``), under the same owner: a stall is counted once, in all;
- loop time per owner (``book_busy``), from the loop-time hook's accountant.

Multiprocess mode: the mirrors copy the totals where other workers' scrapes read them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from loopwatch.stall import Stall, remember
from loopwatch.stats import HistogramData, Shard, StatsBook

__all__ = ["BusySink", "Ledger"]

logger = logging.getLogger("loopwatch")

# another taker of booked loop time, beside the books (the pytest plugin's per test)
BusySink = Callable[[tuple[str, str], float], None]


class Ledger:
    """The books of one event loop."""

    def __init__(self, lag: HistogramData, clock: Callable[[], float]) -> None:
        self.lag = lag  # written by the heartbeat; every shard of this loop shares it
        self.books: dict[StatsBook, Shard] = {}
        self.busy_sinks: list[BusySink] = []
        self._clock = clock
        self._lock = threading.Lock()
        # ((method, route), start) of the stall being booked live, for the in-progress gauge
        self._live: tuple[tuple[str, str], float] | None = None
        self._mirror_failed = False

    def attach(self, book: StatsBook) -> Shard:
        """The shard this loop writes for ``book`` (one registry's aggregates)."""
        shard = self.books.get(book)
        if shard is None:
            with self._lock:
                shard = self.books.get(book)
                if shard is None:
                    shard = self.books[book] = book.new_shard(self.lag)
        return shard

    def book_live(self, owner: tuple[str, str], start: float, stalls: int, seconds: float) -> None:
        """A stall's seconds so far (and its one count, the first time), while it lasts."""
        self._live = (owner, start)
        for book, shard in list(self.books.items()):
            book.book_stall_time(shard, owner[0], owner[1], stalls, seconds)

    def hold_ended(self, start: float) -> None:
        """The hold that started at ``start`` is over: no stall in progress from it."""
        live = self._live
        if live is not None and live[1] == start:
            self._live = None

    def clear_live(self) -> None:
        self._live = None

    def stall_in_progress(self) -> tuple[tuple[str, str], float] | None:
        """((method, route), age) of the stall being booked right now, if any."""
        live = self._live
        if live is None:
            return None
        return live[0], self._clock() - live[1]

    def book_stall(self, stall: Stall, booked: float | None) -> None:
        """A closed stall: the ring, the histogram, and what the live booking did not count
        yet (``booked``: the seconds it booked, None if it booked none)."""
        remember(stall)
        if booked is None:
            stalls, seconds = 1, stall.duration
        else:
            stalls, seconds = 0, max(0.0, stall.duration - booked)
        traced = stall.trace_id != ""
        exemplar = (stall.trace_id, stall.span_id, stall.started_at + stall.duration)
        for book, shard in list(self.books.items()):
            book.observe_stall(
                shard, stall.method, stall.route, stall.kind, stall.duration,
                exemplar if traced else None,
            )  # fmt: skip
            book.book_stall_time(shard, stall.method, stall.route, stalls, seconds)
        self.sync_mirrors()  # multiprocess mode: other workers' scrapes see it now

    def book_busy(self, key: tuple[str, str], seconds: float) -> None:
        """Loop time of (method, route), from the loop-time accountant."""
        for book, shard in list(self.books.items()):
            book.book_busy(shard, key, seconds)
        for sink in list(self.busy_sinks):
            sink(key, seconds)

    def busy_total(self) -> float | None:
        """Loop time booked so far for this loop (each shard gets the same bookings)."""
        for book, shard in list(self.books.items()):
            return book.busy_total(shard)
        return None

    def sync_mirrors(self) -> None:
        for book in list(self.books):
            try:
                book.sync_mirror()
            except Exception:
                if not self._mirror_failed:
                    self._mirror_failed = True
                    logger.exception("loopwatch: multiprocess metrics sync failed")

    def retire(self) -> None:
        """The loop is gone: fold its aggregates into each book's kept totals."""
        for book, shard in list(self.books.items()):
            book.retire(shard)
        self.books.clear()
