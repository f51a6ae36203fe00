"""Unit tests of the detect stage: the hold state machine, driven with an injected clock, frames,
owners and CPU figures, and a recording of what it tells the pipeline. No loop runs."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType

import pytest

from loopwatch.attribute import Owner
from loopwatch.detect import Detector, Hold, Probes, Verdict
from loopwatch.frames import CodeFilter
from loopwatch.requests import RequestRecord


class Figures:
    """The loop thread's CPU clock and schedstat (on CPU, runnable but waiting), moved by
    the test as a loaded machine would move them."""

    def __init__(self) -> None:
        self.on_cpu = 0.0
        self.waiting = 0.0

    def cpu(self) -> float:
        return self.on_cpu

    def sched(self) -> tuple[float, float]:
        return (self.on_cpu, self.waiting)


class Recorder:
    """The pipeline's side of ``HoldEvents``: what the detector told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.closed_holds: list[tuple[Hold, Verdict | None]] = []
        self.live: dict[tuple[str, str], list[float]] = {}

    def opened(self, hold: Hold) -> None:
        self.events.append(("opened", hold.owner.label))

    def booked(self, hold: Hold, stalls: int, seconds: float) -> None:
        entry = self.live.setdefault(hold.label, [0, 0.0])
        entry[0] += stalls
        entry[1] += seconds

    def still_held(self, hold: Hold, age: float, culprit: str, stack: str) -> None:
        self.events.append(("still", round(age, 2)))

    def closed(self, hold: Hold, verdict: Verdict | None, now: float) -> None:
        self.closed_holds.append((hold, verdict))

    def stalls(self) -> list[tuple[tuple[str, str], Verdict]]:
        return [(h.label, v) for h, v in self.closed_holds if v is not None]


BACKGROUND = Owner(object(), None, ("-", "<background>"), background=True)


def request(route: str) -> Owner:
    record = RequestRecord("GET", {}, "")
    return Owner(record, record, ("GET", route))


class Rig:
    """A detector with a settable clock, owner and CPU figures, and the loop thread's frame
    (this test's own: application code, never idle)."""

    def __init__(
        self,
        threshold: float = 0.1,
        interval: float = 0.01,
        gc_within: Callable[[float, float], tuple[float, int, float]] | None = None,
    ) -> None:
        self.now = 0.0
        self.owner = BACKGROUND
        self.figures = Figures()
        self.events = Recorder()
        frame: FrameType = sys._getframe()
        self.detector = Detector(
            threshold=threshold, interval=interval, long_stall=10.0,
            clock=lambda: self.now, frames=lambda: {0: frame}, code_filter=CodeFilter(),
            attribute=lambda: self.owner, in_flight=lambda: 1, events=self.events,
            gc_within=gc_within,
        )  # fmt: skip
        self.detector.probes = Probes(self.figures.cpu, self.figures.sched)

    def run(self, beat: float, until: float, step: float = 0.01) -> None:
        """Checks every ``step`` seconds up to ``until`` while the heartbeat last ran at
        ``beat``."""
        while self.now + step <= until + 1e-9:
            self.now = round(self.now + step, 6)
            self.detector.check(beat)


@pytest.mark.parametrize("after", ["cpu", "starved"])
def test_a_late_check_does_not_charge_the_time_after_the_hold_to_it(after: str) -> None:
    # A 0.3 s sleep on the loop, then the check that sees it end comes 0.5 s late (a loaded
    # machine), while the loop thread computes (cpu) or waits for a core (starved; here the
    # watchdog was held up from 80 ms on, before it could confirm the stall live). The hold
    # is still a 'wait' stall of 0.3 s: what came after it is not its.
    rig = Rig()
    rig.now = 0.01
    rig.run(beat=0.0, until=0.30 if after == "cpu" else 0.08)
    rig.now = 0.8
    if after == "cpu":
        rig.figures.on_cpu += 0.5
    else:
        rig.figures.waiting += 0.5
    rig.detector.check(0.3)  # the heartbeat ran: the hold ended at 0.3 s
    [(label, verdict)] = rig.events.stalls()
    assert label == ("-", "<background>")
    assert verdict.kind == "wait" and verdict.cpu_seconds == 0.0
    assert verdict.duration == pytest.approx(0.3)


def test_a_hold_is_booked_while_it_lasts_and_once_in_all() -> None:
    rig = Rig()
    rig.owner = request("/slow")
    rig.run(beat=0.0, until=0.5)
    live = rig.events.live[("GET", "/slow")]
    assert live[0] == 1 and live[1] == pytest.approx(0.5 - 0.0, abs=0.02)  # from its start
    rig.now = 0.52
    rig.detector.check(0.51)
    [(label, verdict)] = rig.events.stalls()
    assert label == ("GET", "/slow") and verdict.counted
    assert verdict.duration == pytest.approx(0.51)
    assert verdict.booked == pytest.approx(live[1])  # the close books only the rest


def test_a_change_of_owner_while_the_loop_stays_held_splits_the_hold() -> None:
    rig = Rig()
    rig.owner = request("/first")
    rig.run(beat=0.0, until=0.3)
    rig.owner = request("/second")
    rig.run(beat=0.0, until=0.6)
    rig.now = 0.61
    rig.detector.check(0.605)
    stalls = rig.events.stalls()
    assert [label for label, _ in stalls] == [("GET", "/first"), ("GET", "/second")]
    first, second = (v.duration for _, v in stalls)
    assert first == pytest.approx(0.305, abs=0.01) and second == pytest.approx(0.3, abs=0.01)


def test_a_short_hold_is_no_stall_and_is_still_closed() -> None:
    rig = Rig()
    rig.run(beat=0.0, until=0.06)
    rig.now = 0.07
    rig.detector.check(0.065)
    [(hold, verdict)] = rig.events.closed_holds  # every hold ends once, stall or not
    assert verdict is None and hold.end == 0.065
    assert not rig.detector.stalling


def test_a_hold_that_is_mostly_cpu_starvation_is_not_a_stall() -> None:
    rig = Rig()
    rig.now = 0.01
    while rig.now < 0.3:
        rig.now = round(rig.now + 0.01, 6)
        rig.figures.waiting += 0.01  # runnable, not scheduled: the machine is busy
        rig.detector.check(0.0)
    rig.now = 0.31
    rig.detector.check(0.3)
    assert rig.events.live == {} and rig.events.stalls() == []


def test_loopwatchs_own_hold_is_never_booked_nor_a_stall() -> None:
    rig = Rig()
    rig.owner = Owner(object(), None, ("-", "<loopwatch>"), booked=False)
    rig.run(beat=0.0, until=0.4)
    rig.now = 0.41
    rig.detector.check(0.4)
    assert rig.events.live == {} and rig.events.stalls() == []
    assert [v for _, v in rig.events.closed_holds] == [None]


def test_a_cpu_hold_is_cpu() -> None:
    rig = Rig()
    rig.now = 0.01
    while rig.now < 0.3:
        rig.now = round(rig.now + 0.01, 6)
        rig.figures.on_cpu += 0.01
        rig.detector.check(0.0)
    rig.now = 0.31
    rig.detector.check(0.3)
    [(_, verdict)] = rig.events.stalls()
    assert verdict.kind == "cpu" and verdict.cpu_seconds == pytest.approx(0.29, abs=0.02)


def test_a_background_hold_with_no_stack_sample_is_not_a_stall() -> None:
    # The whole process was starved (the watchdog too): its first look at the hold comes as
    # the loop is free again, with no frame of the loop thread to show code. A late heartbeat
    # with no code seen is not a stall (it was reported with an <unknown> culprit).
    rig = Rig()
    rig.detector = Detector(
        threshold=0.1, interval=0.01, long_stall=10.0, clock=lambda: rig.now, frames=dict,
        code_filter=CodeFilter(), attribute=lambda: rig.owner, in_flight=lambda: 0,
        events=rig.events,
    )  # fmt: skip
    rig.run(beat=0.0, until=0.3)
    rig.now = 0.31
    rig.detector.check(0.3)
    assert rig.events.live == {} and rig.events.stalls() == []
    # a request's hold is its request's, sampled or not: the owner is known
    rig.owner = request("/slow")
    rig.run(beat=0.3, until=0.7)
    rig.now = 0.71
    rig.detector.check(0.7)
    [(label, verdict)] = rig.events.stalls()
    assert label == ("GET", "/slow") and verdict.culprit == "<unknown>"


def test_a_hold_seen_once_inside_is_not_judged_by_the_starvation_after_it() -> None:
    # The watchdog looks once while the hold lasts (at 80 ms, too young for a stack sample),
    # then not again until 0.6 s, long after the hold ended at 0.265 s, while the loop thread
    # waited for a core running what came next. That wait is not the hold's: a stall of
    # 0.265 s, not CPU starvation.
    rig = Rig(threshold=0.25, interval=0.05)
    rig.owner = request("/barely")
    rig.now = 0.08
    rig.detector.check(0.0)
    rig.now = 0.6
    rig.figures.waiting += 0.3
    rig.detector.check(0.265)
    [(label, verdict)] = rig.events.stalls()
    assert label == ("GET", "/barely") and verdict.duration == pytest.approx(0.265)


def test_a_hold_that_routes_its_request_before_it_is_booked_is_the_routes() -> None:
    # Under load the watchdog may first see a hold while its step is still before routing
    # (a middleware), and the same step then routes the request and blocks in the endpoint.
    # The owner is read at every check until the first booking, and then fixed: the route.
    rig = Rig()
    record = RequestRecord("GET", {}, "")
    rig.owner = Owner(record, record, ("GET", "<routing>"))
    rig.now = 0.02
    rig.run(beat=0.0, until=0.05)  # seen, not booked yet
    rig.owner = Owner(record, record, ("GET", "/block"))  # routed within the same step
    rig.run(beat=0.0, until=0.4)
    rig.owner = Owner(record, record, ("GET", "/later"))  # once booked, it stays
    rig.run(beat=0.0, until=0.5)
    rig.now = 0.51
    rig.detector.check(0.5)
    assert list(rig.events.live) == [("GET", "/block")]
    [(label, verdict)] = rig.events.stalls()
    assert label == ("GET", "/block") and verdict.duration == pytest.approx(0.5)


@pytest.mark.parametrize("starved,reported", [(0.18, True), (0.22, False)])
def test_the_starvation_rule_at_its_boundary(starved: float, reported: bool) -> None:
    # A 0.3 s hold by a request's code, of which the loop thread spent ``starved`` seconds
    # runnable but waiting for a core (a busy machine). The rule (README, "How it works"): it
    # is a stall when what is left, its own part, is at least the threshold (0.1 s): 0.12 s
    # is; 0.08 s is not (on a quiet machine it would have been no stall). Its reported
    # duration is the whole hold: the loop was unavailable that long.
    rig = Rig()
    rig.owner = request("/spin")
    rig.now = 0.0
    steps = 30
    while rig.now < 0.3 - 1e-9:
        rig.now = round(rig.now + 0.01, 6)
        rig.figures.waiting += starved / steps
        rig.figures.on_cpu += (0.3 - starved) / steps
        rig.detector.check(0.0)
    rig.now = 0.31
    rig.detector.check(0.3)
    stalls = rig.events.stalls()
    if reported:
        [(label, verdict)] = stalls
        assert label == ("GET", "/spin") and verdict.duration == pytest.approx(0.3)
        assert rig.events.live[("GET", "/spin")][0] == 1  # booked live by the same rule
    else:
        assert stalls == [] and rig.events.live == {}


def test_a_call_that_keeps_the_gil_is_gil_and_named_at_its_line() -> None:
    # The watchdog could not run for 0.4 s (it woke that late) while the loop thread
    # computed: one C call kept the GIL. Its first check after the call is the only look.
    rig = Rig()
    rig.owner = request("/parse")
    waited = [0.0]
    rig.detector.probes = Probes(rig.figures.cpu, rig.figures.sched, lambda: waited[0])
    rig.now = 0.01
    rig.detector.check(0.0)  # the loop was free: a base for the CPU clock
    rig.now = 0.43
    rig.figures.on_cpu += 0.41
    rig.detector.check(0.01, kept_out=0.4)
    rig.now = 0.45
    rig.detector.check(0.44)
    [(label, verdict)] = rig.events.stalls()
    assert label == ("GET", "/parse") and verdict.kind == "gil"
    assert verdict.cpu_seconds == pytest.approx(0.41) and verdict.duration == pytest.approx(0.43)
    assert "test_detect.py" in verdict.culprit  # this test's frame: the loop thread's


def test_a_call_that_keeps_the_gil_from_before_the_first_check_is_gil() -> None:
    # The call starts 3 ms after the loop (TestClient reaches the endpoint that fast), before
    # the watchdog's first check: the only base is what the loop thread read as the watchdog
    # started, its CPU clock among it. Without that, the first check (0.32 s late) had
    # nothing to compare the loop thread's CPU with: kind 'wait', cpu_seconds 0.
    rig = Rig()
    rig.owner = request("/parse")
    rig.detector.probes = Probes(rig.figures.cpu, rig.figures.sched, lambda: 0.0)
    rig.figures.on_cpu = 1.0  # the loop thread's CPU clock before the call
    rig.detector.started(0.0, process_cpu=2.0, thread_cpu=1.0)
    rig.now = 0.33
    rig.figures.on_cpu += 0.32
    rig.detector.check(0.0, kept_out=0.32)
    rig.now = 0.34
    rig.detector.check(0.335)
    [(label, verdict)] = rig.events.stalls()
    assert label == ("GET", "/parse") and verdict.kind == "gil", verdict
    assert verdict.cpu_seconds == pytest.approx(0.32)


@pytest.mark.parametrize("cause", ["watchdog-starved", "loop-idle"])
def test_a_late_watchdog_that_did_not_wait_for_the_gil_is_not_gil(cause: str) -> None:
    # The watchdog woke 0.4 s late because it waited for a core (its own schedstat says so),
    # or the loop thread did not compute meanwhile (a paused process): not a kept GIL.
    rig = Rig()
    rig.owner = request("/spin")
    waited = [0.0]
    rig.detector.probes = Probes(rig.figures.cpu, rig.figures.sched, lambda: waited[0])
    rig.now = 0.01
    rig.detector.check(0.0)
    rig.now = 0.43
    if cause == "watchdog-starved":
        waited[0] += 0.35
        rig.figures.on_cpu += 0.41  # the loop computed, letting the GIL go
    rig.detector.check(0.01, kept_out=0.4)
    rig.now = 0.45
    rig.detector.check(0.44)
    kinds = [v.kind for _, v in rig.events.stalls()]
    assert "gil" not in kinds
    if cause == "watchdog-starved":
        # the loop thread's CPU while the watchdog waited for a core is the hold's: counted
        # from the check before (read only at the late check, it was lost: kind 'wait')
        [(_, verdict)] = rig.events.stalls()
        assert verdict.kind == "cpu" and verdict.cpu_seconds == pytest.approx(0.41)


def test_a_hold_the_collector_made_is_gc_with_its_seconds_and_generation() -> None:
    pauses = [(0.05, 0.25, 2), (0.26, 0.27, 0)]  # (start, end, generation), the hold's clock

    def within(start: float, end: float) -> tuple[float, int, float]:
        seconds = sum(max(0.0, min(b, end) - max(a, start)) for a, b, _ in pauses)
        generation = max((g for a, b, g in pauses if min(b, end) > max(a, start)), default=-1)
        return seconds, generation, seconds

    rig = Rig(gc_within=within)
    rig.owner = request("/objects")
    rig.run(beat=0.0, until=0.3)
    rig.now = 0.31
    rig.detector.check(0.3)
    [(_, verdict)] = rig.events.stalls()
    assert verdict.kind == "gc"
    assert verdict.gc_seconds == pytest.approx(0.21) and verdict.gc_generation == 2


@pytest.mark.parametrize("on_cpu", [True, False])
def test_a_collection_the_watchdog_never_saw_inside_is_still_a_gc_stall(on_cpu: bool) -> None:
    # The collector keeps the GIL: the watchdog looks only once the loop is back in its
    # selector, and has no frame showing code (here: none at all). Without the collector's
    # own account that is a late heartbeat, dropped; with it, the collector held the loop
    # (the README demo's def-route stall, dropped when the loop's owner was nobody). A
    # collection that mostly waited for a core (on a thread the loop thread's schedstat does
    # not cover) is starvation, dropped as before
    def within(start: float, end: float) -> tuple[float, int, float]:
        seconds = max(0.0, min(0.28, end) - max(0.02, start))
        return seconds, 2, seconds * (0.9 if on_cpu else 0.2)

    rig = Rig()
    rig.detector = Detector(
        threshold=0.1, interval=0.01, long_stall=10.0, clock=lambda: rig.now, frames=dict,
        code_filter=CodeFilter(), attribute=lambda: rig.owner, in_flight=lambda: 0,
        events=rig.events, gc_within=within,
    )  # fmt: skip
    rig.run(beat=0.0, until=0.3)
    rig.now = 0.31
    rig.detector.check(0.3)
    if not on_cpu:
        assert rig.events.stalls() == []
        return
    [(label, verdict)] = rig.events.stalls()
    assert label == ("-", "<background>")
    assert verdict.kind == "gc" and verdict.gc_generation == 2
    assert verdict.gc_seconds == pytest.approx(0.26)


@pytest.mark.parametrize("collector", ["gc", "none", "starved"])
def test_a_hold_no_check_saw_is_a_gc_stall_only_if_the_collector_made_it(collector: str) -> None:
    # The watchdog collected on its own thread (or was starting while the loop's first step
    # kept the GIL): no check found the heartbeat overdue, yet it ran 0.3 s late. The
    # collector's record says what held the loop: its collection is a gc stall, once; a gap
    # it did not make (nor one it made while waiting for a core) is not booked unjudged.
    def within(start: float, end: float) -> tuple[float, int, float]:
        if collector == "none":
            return 0.0, -1, 0.0
        seconds = max(0.0, min(0.29, end) - max(0.01, start))
        return seconds, 2, seconds * (0.9 if collector == "gc" else 0.2)

    rig = Rig(gc_within=within)
    rig.now = 0.305
    rig.detector.beat_late(0.0, 0.3)  # told by the heartbeat, on the loop's thread
    rig.detector.check(0.3)  # the first check since: the heartbeat is on time again
    for beat in (0.31, 0.32, 0.33):  # and the checks after it: nothing more
        rig.now = beat + 0.005
        rig.detector.check(beat)
    if collector != "gc":
        assert rig.events.closed_holds == []
        return
    [(label, verdict)] = rig.events.stalls()
    assert label == ("-", "<background>")
    assert verdict.kind == "gc" and verdict.gc_generation == 2
    assert verdict.duration == pytest.approx(0.3) and verdict.gc_seconds == pytest.approx(0.28)
    assert rig.events.events == [("opened", ("-", "<background>"))]


def test_a_late_heartbeat_a_check_watched_is_judged_once() -> None:
    # The usual case: checks saw the heartbeat overdue and judged the hold; the heartbeat's
    # own word that it ran late adds nothing (one stall, not two)
    def within(start: float, end: float) -> tuple[float, int, float]:
        seconds = max(0.0, min(0.25, end) - max(0.03, start))
        return seconds, 2, seconds

    rig = Rig(gc_within=within)
    rig.run(beat=0.0, until=0.26)
    rig.detector.beat_late(0.0, 0.26)
    rig.now = 0.27
    rig.detector.check(0.26)
    rig.now = 0.28
    rig.detector.check(0.275)
    [(_, verdict)] = rig.events.stalls()
    assert verdict.kind == "gc" and verdict.duration == pytest.approx(0.26)


def test_a_watched_hold_ends_at_the_first_beat_after_it_not_the_last() -> None:
    # Checks saw the hold from 0; it ended at 0.25 (the heartbeat said so: a late beat),
    # then the collector held the loop 0.26-0.46 while the watchdog could not look, and the
    # next beat came at 0.47. Two stalls, one each, their seconds not counted twice.
    def within(start: float, end: float) -> tuple[float, int, float]:
        seconds = max(0.0, min(0.46, end) - max(0.26, start))
        return seconds, 2, seconds

    rig = Rig(gc_within=within)
    rig.run(beat=0.0, until=0.24)
    rig.detector.beat_late(0.0, 0.25)
    rig.detector.beat_late(0.25, 0.47)
    rig.now = 0.48
    rig.detector.check(0.47)
    rig.now = 0.49
    rig.detector.check(0.485)
    stalls = [verdict for _, verdict in rig.events.stalls()]
    assert [round(v.duration, 2) for v in stalls] == [0.25, 0.22]
    assert [v.kind for v in stalls] == ["wait", "gc"]


def test_a_late_heartbeat_told_as_the_loop_stops_is_still_judged() -> None:
    def within(start: float, end: float) -> tuple[float, int, float]:
        return end - start - 0.01, 2, end - start - 0.01

    rig = Rig(gc_within=within)
    rig.detector.beat_late(0.0, 0.2)
    rig.now = 0.21
    rig.detector.last_check(0.2, stopped_at=0.21, running=False)
    [(_, verdict)] = rig.events.stalls()
    assert verdict.kind == "gc" and verdict.duration == pytest.approx(0.2)


def test_a_collection_inside_loopwatchs_own_code_is_the_apps_gc_stall() -> None:
    # The collector runs on whichever allocation crosses its threshold: in a `def`-route app
    # the loop thread mostly runs loopwatch's heartbeat, so that is often loopwatch's. The
    # collection still holds the loop, on the app's heap: a gc stall of <background>, not a
    # hold of loopwatch's own dropped (the README demo's def-route stall, lost 1 run in 12
    # under load). A hold of loopwatch's own that no collection made stays nobody's.
    def within(start: float, end: float) -> tuple[float, int, float]:
        seconds = max(0.0, min(0.25, end) - max(0.03, start))
        return seconds, 2, seconds

    rig = Rig(gc_within=within)
    rig.owner = Owner(object(), None, ("-", "<loopwatch>"), booked=False)
    rig.run(beat=0.0, until=0.26)
    rig.figures.on_cpu += 0.22
    rig.now = 0.27
    rig.detector.check(0.26)
    rig.run(beat=0.26, until=0.6)  # loopwatch's own again, and no collection: nobody's
    rig.now = 0.61
    rig.detector.check(0.6)
    assert rig.events.live == {}
    [(label, verdict)] = rig.events.stalls()
    assert label == ("-", "<background>")
    assert verdict.kind == "gc" and verdict.gc_generation == 2
    assert verdict.gc_seconds == pytest.approx(0.22) and verdict.duration == pytest.approx(0.26)
    assert [v is None for _, v in rig.events.closed_holds] == [False, True]


@pytest.mark.parametrize("process_ran", [False, True])
def test_a_paused_process_is_no_stall_but_another_threads_gil_is(process_ran: bool) -> None:
    # The watchdog woke 0.5 s late without waiting for a core, and the loop thread did not
    # run. If no thread of the process ran either, the process was paused (SIGSTOP, a frozen
    # container): no stall, whatever the loop was running when it froze (here the server's
    # own code, which the idle rule does not cover). If another thread ran, it kept the GIL
    # from the loop: the loop was held, a 'wait' stall of its owner.
    rig = Rig()
    rig.owner = Owner(object(), None, ("-", "<server>"))
    process = [1.0]
    rig.detector.probes = Probes(
        rig.figures.cpu, rig.figures.sched, lambda: 0.0, lambda: process[0]
    )  # fmt: skip
    rig.now = 0.01
    rig.detector.check(0.0)
    rig.now = 0.52
    if process_ran:
        process[0] += 0.5
    rig.detector.check(0.01, kept_out=0.5)
    rig.now = 0.54
    rig.detector.check(0.53)
    if process_ran:
        [(label, verdict)] = rig.events.stalls()
        assert label == ("-", "<server>") and verdict.kind == "wait"
    else:
        assert rig.events.stalls() == [] and rig.events.live == {}
