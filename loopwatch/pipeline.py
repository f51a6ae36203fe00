"""The pipeline of one watched loop, and one check of it.

At every watchdog check: **detect** (``detect``: is the loop held, is it a stall) asks
**attribute** (``attribute``: who owns it); the detector's events go to **book**
(``book``: counters, histogram, loop time and ring, once per hold) and then to **deliver**
(``deliver``: log, ``on_stall``, OpenTelemetry). Loop time (``accounting``), the loop profile
(``profile``) and the live page's timeline are measured on the same checks. The exporters read
what was booked.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable
from types import CodeType
from typing import TYPE_CHECKING

from loopwatch.accounting import Accountant, start_accounting
from loopwatch.attribute import Attributor, Owner
from loopwatch.book import Ledger
from loopwatch.config import Settings
from loopwatch.deliver import Delivery
from loopwatch.detect import Detector, Hold, Probes, Verdict
from loopwatch.frames import CodeFilter, FrameSource
from loopwatch.gcpauses import gc_pauses
from loopwatch.profile import LoopSampler
from loopwatch.requests import RequestRecord
from loopwatch.stats import HistogramData
from loopwatch.timeline import Timeline

if TYPE_CHECKING:
    from loopwatch.otel import OtelBridge

__all__ = ["Pipeline"]

logger = logging.getLogger("loopwatch")


class Pipeline:
    """The stages of one loop, composed (``detect.HoldEvents`` is this class's side)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: Settings,
        *,
        clock: Callable[[], float],
        frames: FrameSource,
        code_filter: CodeFilter,
        own: RequestRecord,
        requests: Iterable[RequestRecord],
        lag: HistogramData,
        on_loop: Callable[..., None],
    ) -> None:
        self.loop = loop
        self.settings = settings
        self._clock = clock
        self._requests = requests  # the loop's requests in flight (the middleware's set)
        self.lag = lag
        self.timeline = Timeline()  # the last minutes, one point a second, for the live page
        self.accountant: Accountant | None = None  # loop time, when on
        self.ledger = Ledger(lag, clock)
        self.delivery = Delivery(clock=clock, in_flight=self.in_flight_requests, on_loop=on_loop)
        self.detector = Detector(
            threshold=settings.threshold, interval=settings.interval,
            long_stall=settings.long_stall, clock=clock, frames=frames,
            code_filter=code_filter, attribute=self.attribute,
            in_flight=lambda: len(self.in_flight_requests()), events=self,
            gc_within=gc_pauses.within,
        )  # fmt: skip
        self.attributor = Attributor(
            loop, own, self.detector.loop_frame, lambda: self.detector.idle_codes,
            self._timed_callback,
        )  # fmt: skip
        self._sampler: LoopSampler | None = None
        self._next_drain = 0.0
        self._gc_timed = False  # this loop counts as a user of the GC callback
        # OpenTelemetry metrics: the heartbeat hands its lag values over through the tap
        self.lag_tap: collections.deque[float] | None = None

    # -- start (the loop's thread, then the watchdog's) -------------------------------------

    def start_on_loop(self, thread_id: int, entry_codes: frozenset[CodeType]) -> None:
        """On the loop's thread: the thread whose stack is sampled, and the hooks."""
        self.detector.loop_thread_id = thread_id
        self.detector.idle_codes = entry_codes
        if not self._gc_timed:
            self._gc_timed = True
            gc_pauses.start()
        if self.settings.loop_time:
            self.accountant = start_accounting(
                self.loop, self.ledger.book_busy, loop_frame=self.detector.loop_frame
            )
        if self.settings.profile:
            self._sampler = LoopSampler(
                self.loop, self.detector, lambda: self.accountant, self.attribute,
                self.attributor.task_request,
            )  # fmt: skip
            self._sampler.start_on_loop()

    def start_watching(self, native_id: int) -> None:
        """On the watchdog's thread: the CPU clock and schedstat probes read /proc, and the
        server's package directories are resolved, never on the loop."""
        self.detector.probes = Probes.for_thread(self.detector.loop_thread_id, native_id)
        self.attributor.server_code.dirs()

    # -- one check (the watchdog's thread) --------------------------------------------------

    def check(self, last_beat: float, overdue_after: float, kept_out: float = 0.0) -> None:
        # detect first: it reads the loop thread's stack before anything lets the GIL go
        self.detector.check(last_beat, kept_out)
        otel = self.delivery.otel
        if otel is not None and self.lag_tap:
            otel.record_lag(self.lag_tap)
        now = self._clock()
        late = now - last_beat
        self.timeline.tick(
            now, late, late > overdue_after, self.lag.bounds, self.lag.counts,
            self.ledger.busy_total() if self.accountant is not None else None,
        )  # fmt: skip
        accountant = self.accountant
        if accountant is not None:
            accountant.check()
            if self._clock() >= self._next_drain:
                self._next_drain = self._clock() + 0.25
                accountant.drain(self.in_flight_requests())
        if self._sampler is not None:
            self._sampler.sample(kept_out)  # the loop profile: where the loop time goes

    def reset(self) -> None:
        """After a failed check: the next one starts afresh."""
        self.detector.reset()
        self.ledger.clear_live()

    def last_check(self, last_beat: float, stopped_at: float, running: bool) -> None:
        """The loop let go at ``stopped_at``: its hold in progress is closed and delivered."""
        self.detector.last_check(last_beat, stopped_at, running)

    def remove_hooks(self) -> None:
        """Stopping leaves no hook behind: the loop-time hook, after booking what it
        measured last."""
        if self._gc_timed:
            self._gc_timed = False
            gc_pauses.stop()
        if self._sampler is not None:
            self._sampler.stop()
        accountant = self.accountant
        if accountant is not None:
            accountant.stop()
            accountant.drain(self.in_flight_requests())

    def attribute(self) -> Owner:
        return self.attributor.owner()

    def _timed_callback(self) -> RequestRecord | tuple[str, str] | None:
        accountant = self.accountant
        return accountant.running_owner() if accountant is not None else None

    def in_flight_requests(self) -> list[RequestRecord]:
        """A copy of the loop's set of requests, which the loop may change meanwhile."""
        for _ in range(3):
            try:
                return list(self._requests)
            except RuntimeError:  # changed size during the copy
                continue
        return []

    # -- what the detector tells (``detect.HoldEvents``): book, then deliver -----------------

    def opened(self, hold: Hold) -> None:
        self.delivery.opened(hold)

    def booked(self, hold: Hold, stalls: int, seconds: float) -> None:
        self.ledger.book_live(hold.label, hold.start, stalls, seconds)
        if stalls:
            self.delivery.confirmed(hold)

    def still_held(self, hold: Hold, age: float, culprit: str, stack: str) -> None:
        self.delivery.still_held(hold, age, culprit, stack)

    def closed(self, hold: Hold, verdict: Verdict | None, now: float) -> None:
        self.ledger.hold_ended(hold.start)
        if verdict is None:
            self.delivery.forget(hold)
            return
        stall = self.delivery.stall(hold, verdict, now)
        # the books first: a callback that reads the metrics finds the stall there
        self.ledger.book_stall(stall, verdict.booked if verdict.counted else None)
        self.delivery.deliver(stall)

    # -- OpenTelemetry -----------------------------------------------------------------------

    def use_otel(self, bridge: OtelBridge) -> None:
        """Hand stalls to OpenTelemetry (the loop's first middleware with it wins)."""
        if not self.delivery.use_otel(bridge):
            return
        if bridge.metrics is not None:
            self.lag_tap = collections.deque(maxlen=100_000)

    def lag_observed(self, late: float) -> None:
        """The heartbeat's lag, for OpenTelemetry's histogram (on the loop: one append)."""
        tap = self.lag_tap
        if tap is not None:
            tap.append(late)
