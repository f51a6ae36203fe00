"""Unit tests of the book stage: one ledger writes every figure of a hold once, into every
registry's book, and a scrape's totals say the same as the stall record."""

from __future__ import annotations

import pytest

from loopwatch.book import Ledger
from loopwatch.stall import Stall, clear_recent_stalls, recent_stalls
from loopwatch.stats import LAG_BUCKETS, HistogramData, StatsBook

OWNER = ("GET", "/slow")


def stall(duration: float, route: str = "/slow") -> Stall:
    return Stall(
        route=route, method="GET", kind="wait", duration=duration, started_at=1000.0,
        culprit="app.py:1 in slow", stack="",
    )  # fmt: skip


def ledger_with(*books: StatsBook, now: list[float] | None = None) -> Ledger:
    clock = now or [0.0]
    ledger = Ledger(HistogramData(LAG_BUCKETS), lambda: clock[0])
    for book in books:
        ledger.attach(book)
    return ledger


@pytest.fixture(autouse=True)
def _ring() -> None:
    clear_recent_stalls()


def test_a_stall_booked_live_is_counted_once_and_its_seconds_add_up_to_its_duration() -> None:
    book = StatsBook()
    ledger = ledger_with(book)
    ledger.book_live(OWNER, 0.0, 1, 0.3)  # the first check past the threshold
    ledger.book_live(OWNER, 0.0, 0, 0.2)  # the next ones
    assert book.totals().stall_time[OWNER] == [1, pytest.approx(0.5)]
    ledger.book_stall(stall(0.62), booked=0.5)  # closed: the rest, and the histogram
    totals = book.totals()
    assert totals.stall_time[OWNER] == [1, pytest.approx(0.62)]
    assert sum(totals.stalls[(*OWNER, "wait")].counts) == 1
    assert totals.stalls[(*OWNER, "wait")].total == pytest.approx(0.62)
    assert [s.duration for s in recent_stalls()] == [0.62]


def test_a_stall_not_booked_live_is_booked_whole_at_its_close() -> None:
    book = StatsBook()
    ledger_with(book).book_stall(stall(0.15), booked=None)
    assert book.totals().stall_time[OWNER] == [1, pytest.approx(0.15)]


def test_the_live_booking_is_never_taken_back_when_the_close_reads_shorter() -> None:
    book = StatsBook()
    ledger = ledger_with(book)
    ledger.book_live(OWNER, 0.0, 1, 0.5)
    ledger.book_stall(stall(0.48), booked=0.5)  # a counter never goes down
    assert book.totals().stall_time[OWNER] == [1, pytest.approx(0.5)]


def test_every_registry_and_every_sink_gets_the_same_loop_time() -> None:
    first, second = StatsBook(), StatsBook()
    ledger = ledger_with(first, second)
    seen: list[tuple[tuple[str, str], float]] = []
    ledger.busy_sinks.append(lambda key, seconds: seen.append((key, seconds)))
    ledger.book_busy(OWNER, 0.004)
    ledger.book_busy(OWNER, 0.006)
    for book in (first, second):
        busy = book.totals().busy or {}
        assert busy[OWNER] == pytest.approx(0.01)  # (and the zero series)
        assert sum(busy.values()) == pytest.approx(0.01)
    assert ledger.busy_total() == pytest.approx(0.01)
    assert seen == [(OWNER, 0.004), (OWNER, 0.006)]


def test_the_stall_in_progress_is_the_one_booked_live_until_its_hold_ends() -> None:
    now = [10.0]
    ledger = ledger_with(StatsBook(), now=now)
    assert ledger.stall_in_progress() is None
    ledger.book_live(OWNER, 9.0, 1, 1.0)
    assert ledger.stall_in_progress() == (OWNER, pytest.approx(1.0))
    ledger.hold_ended(5.0)  # another hold's end: not this one
    assert ledger.stall_in_progress() is not None
    ledger.hold_ended(9.0)
    assert ledger.stall_in_progress() is None


def test_a_retired_loop_keeps_its_counts_in_the_totals() -> None:
    book = StatsBook()
    ledger = ledger_with(book)
    ledger.book_live(OWNER, 0.0, 1, 0.4)
    ledger.book_stall(stall(0.4), booked=0.4)
    ledger.book_busy(OWNER, 0.4)
    before = book.totals()
    ledger.retire()
    after = book.totals()
    assert after.stall_time[OWNER] == before.stall_time[OWNER]
    assert after.busy == before.busy
    assert sum(after.stalls[(*OWNER, "wait")].counts) == 1
