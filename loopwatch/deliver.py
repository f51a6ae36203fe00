"""Deliver: a stall goes out to the log, ``on_stall`` and OpenTelemetry, through one place.

Every sink may fail: the failure is logged once per sink, and the stall still reaches the
others. OpenTelemetry also hears of a hold before it ends: the traced requests in flight as
it is first seen are its victims (none can arrive while the loop is held), told on the loop,
first thing once it is free again, before they answer and their spans end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loopwatch.detect import Hold, Verdict
from loopwatch.requests import RequestRecord
from loopwatch.stall import Stall

if TYPE_CHECKING:
    from loopwatch.otel import OtelBridge

__all__ = ["Delivery", "StallCallback"]

logger = logging.getLogger("loopwatch")

StallCallback = Callable[[Stall], Any]


class _Traced:
    """What OpenTelemetry needs of one hold: the culprit's context, read as the hold was
    first seen, and the victims then in flight; whether they were told."""

    __slots__ = ("context", "told", "victims")

    def __init__(self, context: object, victims: tuple[RequestRecord, ...]) -> None:
        self.context = context
        self.victims = victims
        self.told = False


class Delivery:
    """The sinks of one loop's stalls."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        in_flight: Callable[[], list[RequestRecord]],
        on_loop: Callable[..., None],
    ) -> None:
        self.callbacks: list[StallCallback] = []
        self.otel: OtelBridge | None = None
        self._clock = clock
        self._in_flight = in_flight
        self._on_loop = on_loop  # runs a callable on the loop, as loopwatch's own work
        self._failed: set[int] = set()
        self._traced: dict[int, _Traced] = {}  # id(hold) -> its OpenTelemetry data

    def use_otel(self, bridge: OtelBridge) -> bool:
        """Hand stalls to OpenTelemetry; False if a bridge was handed already (it stays)."""
        if self.otel is not None:
            return False
        self.otel = bridge
        return True

    def add_callback(self, callback: StallCallback) -> None:
        if callback not in self.callbacks:
            self.callbacks.append(callback)

    # -- while a hold lasts (watchdog thread) --------------------------------------------

    def opened(self, hold: Hold) -> None:
        otel = self.otel
        if otel is None:
            return
        record = hold.owner.record
        victims: tuple[RequestRecord, ...] = ()
        if otel.tracing:
            victims = self._victims(record)
        self._traced[id(hold)] = _Traced(otel.context_of(hold.owner.task, record), victims)

    def still_held(self, hold: Hold, age: float, culprit: str, stack: str) -> None:
        method, route = hold.label
        logger.warning(
            "event loop blocked for %.1fs so far (still blocked) by %s %s at %s\n%s",
            age, method, route, culprit, stack,
        )  # fmt: skip

    def confirmed(self, hold: Hold) -> None:
        """The hold is a stall: its victims are told as soon as the loop is free."""
        self._tell(hold)

    # -- a closed hold --------------------------------------------------------------------

    def forget(self, hold: Hold) -> None:
        """A hold that was no stall."""
        self._traced.pop(id(hold), None)

    def stall(self, hold: Hold, verdict: Verdict, now: float) -> Stall:
        """The stall record of a closed hold, with its trace ids (OpenTelemetry on)."""
        # a stall not confirmed while it lasted (short, or first taken for starvation): its
        # victims are told now; those that answered meanwhile are skipped
        self._tell(hold)
        traced = self._traced.pop(id(hold), None)
        method, route = hold.label
        otel = self.otel
        fields = otel.stall_fields(traced.context) if otel and traced else {}
        return Stall(
            route=route,
            method=method,
            kind=verdict.kind,
            duration=verdict.duration,
            started_at=time.time() - (now - hold.start),
            culprit=verdict.culprit,
            stack=verdict.stack,
            requests_in_flight=max(hold.in_flight, len(self._in_flight())),
            cpu_seconds=verdict.cpu_seconds,
            gc_seconds=verdict.gc_seconds,
            gc_generation=verdict.gc_generation,
            **fields,
        )

    def deliver(self, stall: Stall) -> None:
        """To the log, OpenTelemetry and the callbacks (after the books: a callback that
        reads the metrics finds the stall there)."""
        extra = {"trace_id": stall.trace_id, "span_id": stall.span_id} if stall.trace_id else None
        logger.warning("%s", stall.describe(), extra=extra)
        if stall.stack and logger.isEnabledFor(logging.DEBUG):
            logger.debug("loop thread stack during the stall:\n%s", stall.stack)
        otel = self.otel
        if otel is not None:
            try:
                otel.record_stall(stall)
            except Exception:
                self._failed_once(otel, "OpenTelemetry stall span/metric failed")
        for callback in list(self.callbacks):
            try:
                callback(stall)
            except Exception:
                self._failed_once(callback, f"on_stall callback {callback!r} failed")

    def _failed_once(self, sink: object, what: str) -> None:
        if id(sink) not in self._failed:
            self._failed.add(id(sink))
            logger.exception("loopwatch: %s", what)

    # -- victims --------------------------------------------------------------------------

    def _victims(self, culprit: RequestRecord | None) -> tuple[RequestRecord, ...]:
        """The traced requests in flight but ``culprit``."""
        return tuple(r for r in self._in_flight() if r is not culprit and r.trace is not None)

    def _tell(self, hold: Hold) -> None:
        traced = self._traced.get(id(hold))
        otel = self.otel
        if traced is None or traced.told or otel is None or not otel.tracing:
            return
        traced.told = True
        if traced.victims:
            self._on_loop(self._tell_victims, hold, traced)

    def _tell_victims(self, hold: Hold, traced: _Traced) -> None:
        """On the loop, as soon as a stall lets go of it: every other traced request in flight
        waited through it (none can finish while the loop is held), and is told now, before
        it resumes and its span ends."""
        otel = self.otel
        if otel is None:
            return
        end = hold.end if hold.end is not None else self._clock()
        method, route = hold.label
        try:
            otel.tell_victims(
                traced.victims, method=method, route=route, culprit=hold.culprit(),
                duration=end - hold.start,
                started_at=time.time() - (self._clock() - hold.start),
                culprit_trace=traced.context,
            )  # fmt: skip
        except Exception:
            self._failed_once(otel, "OpenTelemetry victim events failed")
