"""Unit tests of the deliver stage: one stall record per closed hold, named after its owner,
to the log and every callback; a failing sink is logged once and the others still get every
stall."""

from __future__ import annotations

import logging

import pytest

from loopwatch.attribute import Owner
from loopwatch.deliver import Delivery
from loopwatch.detect import Hold, Verdict
from loopwatch.requests import RequestRecord
from loopwatch.stall import Stall


def closed_hold(route: str = "/slow", in_flight: int = 2) -> tuple[Hold, Verdict]:
    record = RequestRecord("POST", {}, "")
    hold = Hold(Owner(record, record, ("POST", route)), 1.0, 1.2, 10.0, (1.2, None, None),
                in_flight)  # fmt: skip
    verdict = Verdict(kind="cpu", duration=0.4, cpu_seconds=0.38, culprit="app.py:9 in f",
                      stack="  File app.py\n", booked=0.3, counted=True)  # fmt: skip
    return hold, verdict


def delivery(in_flight: int = 0) -> Delivery:
    requests = [RequestRecord("GET", {}, "") for _ in range(in_flight)]
    return Delivery(clock=lambda: 1.4, in_flight=lambda: requests, on_loop=lambda *a: None)


def test_the_stall_record_names_the_holds_owner_and_its_verdict() -> None:
    hold, verdict = closed_hold(in_flight=2)
    stall = delivery(in_flight=5).stall(hold, verdict, now=1.4)
    assert (stall.method, stall.route, stall.kind) == ("POST", "/slow", "cpu")
    assert (stall.duration, stall.cpu_seconds) == (0.4, 0.38)
    assert stall.culprit == "app.py:9 in f" and stall.stack == "  File app.py\n"
    assert stall.requests_in_flight == 5  # the most seen: at its start, or at its close
    assert stall.trace_id == "" and stall.span_id == ""  # no OpenTelemetry


def test_a_failing_callback_is_logged_once_and_the_others_get_every_stall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = delivery()
    got: list[Stall] = []

    def broken(stall: Stall) -> None:
        raise RuntimeError("callback bug")

    sink.add_callback(broken)
    sink.add_callback(got.append)
    sink.add_callback(got.append)  # added once
    hold, verdict = closed_hold()
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        for _ in range(3):
            sink.deliver(sink.stall(hold, verdict, now=1.4))
    assert len(got) == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "on_stall callback" in errors[0].getMessage()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 3 and all(" by POST /slow (cpu) at app.py:9 in f" in m for m in lines)


def test_a_hold_still_held_is_logged_with_its_owner(caplog: pytest.LogCaptureFixture) -> None:
    hold, _ = closed_hold(route="<routing>")
    with caplog.at_level(logging.WARNING, logger="loopwatch"):
        delivery().still_held(hold, 2.0, "app.py:3 in auth", "stack\n")
    [record] = caplog.records
    assert "2.0s so far (still blocked) by POST <routing> at app.py:3 in auth" in (
        record.getMessage()
    )
