"""Detect: the hold state machine, run by the watchdog thread at every check.

The heartbeat (on the loop) records when it last ran. When it is overdue, something holds the
loop: each check asks ``attribute`` who holds it and, once the hold is half the threshold old,
samples the loop thread's stack. A hold is one owner's stretch (two blockers back to back are
two holds) and goes through three steps, each told to a ``HoldEvents`` (the monitor's
pipeline: book, then deliver):

- **opened**: the heartbeat is 1.5 intervals late;
- **booked**: past the threshold, and neither an idle process nor mostly CPU starvation, the
  hold is a stall; its seconds are booked at every check while it lasts;
- **closed**: the heartbeat ran again, or the owner changed, with a ``Verdict``: its duration
  and its kind; or none, for a hold too short, idle or starved.

The kinds: ``gc`` when the garbage collector ran for most of the hold; ``gil`` when the loop
thread computed while keeping the GIL (one C call: the watchdog itself could not run, and woke
that much late); ``cpu`` when it computed and let the GIL go (pure Python switches every 5 ms;
C code such as bcrypt releases it); ``wait`` when it slept or blocked in a call.

A hold made by one call that keeps the GIL is seen only after it: the watchdog gets the GIL
back right after the call returns, while the loop thread still stands on the line that made it.
So each check reads the loop thread's stack and owner first, before anything that lets the GIL
go (reading /proc does), or the loop would have moved on by the time they are read.

Nothing here reads or writes another module's objects but through ``attribute``'s ``Owner``
and the ``HoldEvents`` protocol.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from traceback import FrameSummary
from types import CodeType, FrameType
from typing import NamedTuple, Protocol, TypeVar

from loopwatch import cputimer
from loopwatch.attribute import BACKGROUND_OWNER, Owner
from loopwatch.frames import CodeFilter, FrameSource, format_culprit, format_stack, snapshot

__all__ = ["Detector", "Hold", "HoldEvents", "Probes", "Verdict"]

logger = logging.getLogger("loopwatch")

T = TypeVar("T")

_HANDLER_CODE = cputimer.HANDLER_CODE  # the profile's signal handler, on the loop thread

# (time, the loop thread's CPU clock, its schedstat (on CPU, runnable but waiting)), read
# together; None where the platform has no such figure
Figures = tuple[float, float | None, tuple[float, float] | None]


def _proc_reader(path: str, parse: Callable[[bytes], T]) -> Callable[[], T] | None:
    """Linux: ``parse`` of a /proc file, read with one ``pread`` of a descriptor kept open (it
    is read at every check); None where the file cannot be read or parsed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None

    def read() -> T:
        return parse(os.pread(fd, 128, 0))

    try:
        read()
    except (OSError, ValueError, IndexError):
        os.close(fd)
        return None
    weakref.finalize(read, os.close, fd)
    return read


def _schedstat(text: bytes) -> tuple[float, float]:
    on_cpu, waiting, _ = text.split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _thread_schedstat(native_id: int) -> Callable[[], tuple[float, float]] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread. The second tells
    a loop held by its code from a loop starved by a busy machine."""
    return _proc_reader(f"/proc/self/task/{native_id}/schedstat", _schedstat)


def _own_waiting() -> Callable[[], float] | None:
    """Seconds the calling thread (the watchdog) spent runnable but waiting for a CPU."""
    own = threading.get_native_id()
    return _proc_reader(f"/proc/self/task/{own}/schedstat", lambda text: _schedstat(text)[1])


# futex(2), by machine: the call a thread waiting for the GIL (or a lock) sleeps in
_FUTEX = {"x86_64": 202, "aarch64": 98}


def _thread_blocked(native_id: int) -> Callable[[], bool] | None:
    """Is a thread asleep in a system call other than futex (a sleep, a read, a poll), and so
    not waiting for the GIL? Read from its ``syscall`` file: "running", "-1 ..." (asleep
    outside a call), or the call's number and arguments."""
    futex = _FUTEX.get(os.uname().machine)
    if futex is None:
        return None

    def blocked(text: bytes) -> bool:
        number = text.split(b" ", 1)[0]
        return number.isdigit() and int(number) != futex

    return _proc_reader(f"/proc/self/task/{native_id}/syscall", blocked)


def _thread_cpu_clock(thread_id: int) -> Callable[[], float] | None:
    try:
        clock_id = time.pthread_getcpuclockid(thread_id)
        time.clock_gettime(clock_id)
    except (AttributeError, OSError):  # not on this platform
        return None
    return lambda: time.clock_gettime(clock_id)


class Reading(NamedTuple):
    """At one check: its time, the loop thread's CPU clock and schedstat, the watchdog's
    seconds waiting for a CPU, the process's CPU clock (None: not known)."""

    time: float
    cpu: float | None
    sched: tuple[float, float] | None
    waited: float | None
    process: float | None

    def busy_since(self, last: Reading) -> float | None:
        """The loop thread's seconds computing, or wanting to (runnable), since ``last``: both
        keep it from sleeping. By schedstat where both readings have it, else by its CPU
        clock (the first check's base, read on the loop thread, has no schedstat)."""
        if self.sched is not None and last.sched is not None:
            return sum(self.sched) - sum(last.sched)
        if self.cpu is not None and last.cpu is not None:
            return self.cpu - last.cpu
        return None

    @property
    def figures(self) -> Figures:
        return (self.time, self.cpu, self.sched)


class Probes:
    """The loop thread's CPU clock and schedstat, and the time the watchdog itself waited for
    a CPU. ``for_thread`` reads /proc: call it on the watchdog's thread, never on the loop."""

    def __init__(
        self,
        cpu: Callable[[], float] | None = None,
        sched: Callable[[], tuple[float, float]] | None = None,
        own_waiting: Callable[[], float] | None = None,
        process: Callable[[], float] | None = None,
        blocked: Callable[[], bool] | None = None,
    ) -> None:
        self.cpu = cpu
        self.sched = sched
        self.own_waiting = own_waiting
        self.process = process  # the whole process's CPU clock
        # the loop thread asleep in a call that is not a wait for the GIL (read on demand)
        self.blocked = blocked

    @classmethod
    def for_thread(cls, thread_id: int, native_id: int) -> Probes:
        return cls(
            _thread_cpu_clock(thread_id), _thread_schedstat(native_id), _own_waiting(),
            time.process_time, _thread_blocked(native_id),
        )  # fmt: skip

    def reading(self, now: float) -> Reading:
        """Every figure, read once a check (cheap): what the hold in progress is judged by,
        and what the check after a late wake-up compares with."""
        _, cpu, sched = self.figures(now)
        return Reading(
            now, cpu, sched,
            self.own_waiting() if self.own_waiting is not None else None,
            self.process() if self.process is not None else None,
        )  # fmt: skip

    def figures(self, now: float) -> Figures:
        """The loop thread's CPU clock and schedstat, read now (``now`` is their time)."""
        return (
            now,
            self.cpu() if self.cpu is not None else None,
            self.sched() if self.sched is not None else None,
        )


class Hold:
    """The loop held by one owner, from ``start`` until the owner changes or the loop frees.
    Written by the detector only; the pipeline reads it."""

    __slots__ = (
        "booked_until",
        "confirmed",
        "counted",
        "cpu0",
        "cpu_t0",
        "culprits",
        "end",
        "frozen",
        "gil",
        "idle",
        "in_flight",
        "label",
        "next_long",
        "owner",
        "sampled_at",
        "sched0",
        "stack",
        "start",
        "within",
    )  # fmt: skip

    def __init__(self, owner: Owner, start: float, now: float, long_stall: float,
                 figures: Figures, in_flight: int) -> None:  # fmt: skip
        self.owner = owner
        # (method, route) every view names: read at each check while the hold lasts (the
        # step that holds the loop may route its request), and fixed at its first booking
        self.label = owner.label
        self.start = start
        self.end: float | None = None  # once closed
        self.cpu_t0, self.cpu0, self.sched0 = figures
        self.in_flight = in_flight  # the requests the hold keeps waiting
        # seconds the watchdog could not run while the loop thread computed: the GIL kept
        self.gil = 0.0
        # seconds the watchdog could not run, not waiting for a CPU, while nothing in the
        # process ran: paused (SIGSTOP, a frozen container), no code held the loop
        self.frozen = 0.0
        # no stack sample so far shows the loop running code (none taken, or all idle)
        self.idle = True
        # each culprit seen, with the seconds its samples stand for (the time since the
        # previous sample: the one sample after a call that kept the GIL stands for all of it)
        self.culprits: dict[tuple[str, int, str] | None, float] = {}
        self.sampled_at = start
        self.stack: str | None = None
        self.next_long = long_stall
        # a stall (``confirmed``) is booked at every check up to ``booked_until``; the close
        # books the rest; ``counted``: its one stall is counted
        self.confirmed = False
        self.counted = False
        self.booked_until = start
        # the figures read at the last check while the hold still lasted: the close uses
        # them, so the time between the hold's end and the check that sees it (long on a
        # loaded machine) is not mistaken for the hold's CPU or starvation
        self.within: Figures | None = None

    def culprit(self) -> str:
        """``path:line in function`` most sampled so far; safe from any thread."""
        try:
            seen = dict(self.culprits)  # one C-level copy
        except RuntimeError:  # the watchdog added a sample meanwhile
            return format_culprit(None)
        top = max(seen.items(), key=lambda item: item[1], default=None)  # the first of ties
        return format_culprit(top[0] if top else None)


@dataclass(frozen=True)
class Verdict:
    """What a closed hold was: a stall of ``kind``, ``duration`` seconds long, of which
    ``booked`` seconds were booked while it lasted (0.0 if none)."""

    kind: str
    duration: float
    cpu_seconds: float
    culprit: str
    stack: str
    booked: float
    counted: bool
    gc_seconds: float = 0.0  # of the hold, the garbage collector's
    gc_generation: int = -1  # the oldest generation it collected then (-1: none)


class HoldEvents(Protocol):
    """What the detector tells the pipeline (the monitor), on the watchdog's thread."""

    def opened(self, hold: Hold) -> None: ...

    def booked(self, hold: Hold, stalls: int, seconds: float) -> None: ...

    def still_held(self, hold: Hold, age: float, culprit: str, stack: str) -> None: ...

    def closed(self, hold: Hold, verdict: Verdict | None, now: float) -> None:
        """Every hold ends here once; ``verdict`` None: it was no stall (too short, idle,
        starved, or loopwatch's own)."""


class _Episode:
    """The heartbeat is overdue: the loop has not run it since ``beat``."""

    __slots__ = ("beat", "hold", "last_sample")

    def __init__(self, beat: float, now: float) -> None:
        self.beat = beat
        self.last_sample = now
        self.hold: Hold | None = None


class Detector:
    """The hold state machine of one loop; ``check`` is called by the watchdog thread."""

    def __init__(
        self,
        *,
        threshold: float,
        interval: float,
        long_stall: float,
        clock: Callable[[], float],
        frames: FrameSource,
        code_filter: CodeFilter,
        attribute: Callable[[], Owner],
        in_flight: Callable[[], int],
        events: HoldEvents,
        gc_within: Callable[[float, float], tuple[float, int, float]] | None = None,
    ) -> None:
        self.threshold = threshold
        self.interval = interval
        self.long_stall = long_stall
        self.probes = Probes()
        self.loop_thread_id = 0
        self.idle_codes: frozenset[CodeType] = frozenset()
        self._clock = clock
        self._frames = frames
        self._filter = code_filter
        self._attribute = attribute
        self._in_flight = in_flight
        self._events = events
        self._gc_within = gc_within
        self._episode: _Episode | None = None
        self._last: Reading | None = None  # at the last check
        # gaps between two heartbeats long enough for a stall, (previous beat, beat), told
        # by the loop; and the beats whose gap the checks watched (an episode from them)
        self._late_beats: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self._watched_beats: collections.deque[float] = collections.deque(maxlen=64)
        # how late the last check woke, less the time the watchdog waited for a core: the
        # time it waited for the GIL (the profile's sampler skips such a biased moment)
        self.kept_by_gil = 0.0

    @property
    def stalling(self) -> bool:
        """The heartbeat is overdue right now (a hold is being watched or closed)."""
        return self._episode is not None

    @property
    def hold(self) -> Hold | None:
        """The hold in progress, if any (read from any thread)."""
        episode = self._episode
        return episode.hold if episode is not None else None

    def started(self, now: float, process_cpu: float, thread_cpu: float) -> None:
        """On the loop's thread as its watchdog starts: the base of the first check (a call
        that keeps the GIL may hold it from the start, before that check): the process's CPU
        clock and the loop thread's own (``time.thread_time()``; its schedstat needs /proc)."""
        self._last = Reading(now, thread_cpu, None, None, process_cpu)

    def reset(self) -> None:
        """Forget the hold in progress (after a failed check: the next one starts afresh)."""
        self._episode = None

    def beat_late(self, previous: float, now: float) -> None:
        """On the loop's thread: the heartbeat ran at ``now``, a stall's length after the one
        at ``previous``. One append; the next check looks whether it watched that gap."""
        self._late_beats.append((previous, now))

    def loop_frame(self) -> FrameType | None:
        """The loop thread's current frame (below the profile's signal handler)."""
        return self._loop_frame_outside_handler()[0]

    def is_idle(self, frame: FrameType) -> bool:
        """The loop is waiting for I/O (in its selector, or inside a C loop's run call), not
        running a callback: a late heartbeat then means the process was paused or starved."""
        code = frame.f_code
        return code in self.idle_codes or (
            code.co_name == "select" and code.co_filename.endswith("selectors.py")
        )

    def check(self, beat: float, kept_out: float = 0.0) -> None:
        """One check: ``beat`` is when the heartbeat last ran; ``kept_out``, how much later
        than it asked the watchdog woke for it (it waited for the GIL, or for a CPU)."""
        now = self._clock()
        overdue = now - beat > self.interval * 1.5
        # first, before anything lets the GIL go: who holds the loop and where the loop
        # thread stands (after a call that kept the GIL: the line that made it)
        owner = self._attribute() if overdue else None
        frame, in_handler = self._loop_frame_outside_handler() if overdue else (None, False)
        if in_handler and self._last is not None:
            # the watchdog got the GIL only because the profile's signal handler ran inside
            # the loop thread's call (CPython's long arithmetic runs handlers): without it,
            # the call would have kept the GIL, and the watchdog out, all along
            kept_out = max(kept_out, now - self._last.time)
        sample = self._sample(frame, now - beat, kept_out >= self.interval) if overdue else None
        last, reading = self._last, self.probes.reading(now)
        self._last = reading
        gil, frozen = self._kept_out(kept_out, last, reading)
        episode = self._episode
        if episode is not None and beat != episode.beat:
            # The heartbeat ran again: the hold ended no later than that, and no later than
            # the first beat after it, which the heartbeat told if it came late (a later gap
            # no check saw is judged apart, by ``_unwatched``)
            self._episode = None
            if episode.hold is not None:
                end = next((e for b, e in self._late_beats if b == episode.beat), beat)
                self._close(episode.hold, end=min(end, beat), now=now)
            episode = None
        if self._late_beats:
            self._unwatched(beat, now)
        if owner is None:
            return
        if episode is None:
            episode = self._episode = _Episode(beat, now)
            self._watched_beats.append(beat)
        hold = episode.hold
        if hold is None or hold.owner.key is not owner.key:
            if hold is None:
                start = beat  # the loop was free when the heartbeat last ran
            else:
                # the owner changed between two checks: midway, unless the watchdog was kept
                # out by a call that kept the GIL, which then began as it was kept out
                start = (
                    max(episode.last_sample, now - gil) if gil else (episode.last_sample + now) / 2
                )
                self._close(hold, end=start, now=now)
            figures = reading.figures
            if kept_out >= self.interval and last is not None and last.cpu is not None:
                # the watchdog woke late (the GIL kept, or a busy machine): the loop thread's
                # CPU since the last check belongs to this hold, or its first stretch would be
                # lost (schedstat's starvation test does not apply: it read nothing of it)
                figures = (last.time, last.cpu, None)
            hold = Hold(owner, start, now, self.long_stall, figures, self._in_flight())
            episode.hold = hold
            self._events.opened(hold)
        elif not hold.counted:
            hold.label = owner.label  # the same owner, routed meanwhile, or not
        hold.gil += gil
        hold.frozen += frozen
        episode.last_sample = now
        age = now - hold.start
        if sample is not None:
            # the sample stands for the time since the last check (after a call that kept
            # the GIL: all of it), within the hold
            since = max(hold.sampled_at, last.time) if last is not None else hold.sampled_at
            self._add_sample(hold, age, now - since, sample)
            hold.sampled_at = now
        # at every check while it lasts: a close that comes late (a loaded machine) judges the
        # hold by these, never by figures read after it ended
        hold.within = reading.figures
        if age >= self.threshold:
            self._book_live(hold, age, now)

    def _kept_out(
        self, kept_out: float, last: Reading | None, reading: Reading
    ) -> tuple[float, float]:
        """Seconds since the last check that the watchdog could not run (it woke ``kept_out``
        late, not waiting for a CPU): (while the loop thread computed: a call that kept the
        GIL; while no thread of the process ran: the process was paused). (0.0, 0.0) if it
        was neither, or if the watchdog waited for a CPU (a busy machine: it tells nothing)."""
        waited = (
            reading.waited - last.waited
            if last is not None and reading.waited is not None and last.waited is not None
            else 0.0
        )
        self.kept_by_gil = max(0.0, kept_out - waited)
        if kept_out < self.interval or last is None:
            return 0.0, 0.0
        if waited >= 0.5 * kept_out:
            return 0.0, 0.0  # the watchdog was runnable but not scheduled: a busy machine
        window = min(kept_out, reading.time - last.time)
        if (
            kept_out >= self.threshold / 2  # not a thread holding the GIL, preempted a moment
            and reading.process is not None
            and last.process is not None
            and reading.process - last.process < 0.25 * kept_out
        ):
            return 0.0, window  # stopped, not waiting for a CPU, and nothing ran: paused
        busy = reading.busy_since(last)
        if busy is None or busy < 0.5 * kept_out:
            return 0.0, 0.0  # another thread ran, not the loop's: it kept the GIL from both
        return window, 0.0

    def last_check(self, beat: float, stopped_at: float, running: bool) -> None:
        """The loop let go at ``stopped_at`` (its monitor stops): close the hold in progress
        as ended then. A loop that still ran is brought up to date first (a hold that ended is
        closed, one not seen yet is opened); one that no longer runs was not held."""
        if running:
            self.check(beat)
        episode = self._episode
        if episode is not None:
            self.check(stopped_at if beat == episode.beat else beat)
        self._unwatched(beat, self._clock())

    def _unwatched(self, beat: float, now: float) -> None:
        """Holds no check saw: the heartbeat ran a stall's length late, and no check found it
        overdue meanwhile. The watchdog was kept out all along: a collection on its own thread
        (it cannot look while it collects), or its start-up while the loop's first step kept
        the GIL. With no stack sample, only the collector's record tells what it was: a hold
        the collector made most of is a ``gc`` stall, of ``<background>`` (the loop served
        nothing it could see); any other is not booked, as a check could not judge it."""
        late = self._late_beats
        while late and late[0][1] <= beat:
            began, ended = late.popleft()
            if began in self._watched_beats:
                continue  # a check saw the heartbeat overdue: that hold is judged as usual
            duration = ended - began
            gc_seconds, gc_generation, gc_cpu = (
                self._gc_within(began, ended) if self._gc_within is not None else (0.0, -1, 0.0)
            )
            if gc_seconds < 0.5 * duration or gc_cpu < 0.5 * gc_seconds:
                logger.debug("loopwatch: %.3fs hold no check saw, not the collector's", duration)
                continue
            hold = Hold(BACKGROUND_OWNER, began, now, self.long_stall, (began, None, None),
                        self._in_flight())  # fmt: skip
            hold.end = ended
            self._events.opened(hold)
            verdict = Verdict(
                kind="gc", duration=duration, cpu_seconds=gc_cpu, culprit=hold.culprit(),
                stack="", booked=0.0, counted=False, gc_seconds=gc_seconds,
                gc_generation=gc_generation,
            )  # fmt: skip
            self._events.closed(hold, verdict, now)

    def _book_live(self, hold: Hold, age: float, now: float) -> None:
        """Book the stall's seconds while it lasts, so ``rate()`` shows a freeze as it
        happens. The same tests as ``_close`` decide first that the hold is a stall."""
        if not hold.owner.booked:
            return  # loopwatch's own: never the app's
        if not hold.confirmed:
            if hold.frozen >= 0.5 * age:
                return  # so far mostly a paused process: nothing ran
            if hold.owner.background and hold.idle:
                # no stack sample showed code yet: a paused or starved process idle in its
                # selector (or not sampled at all) is no evidence of a blocking call
                return
            sched, sched0 = hold.within[2] if hold.within is not None else None, hold.sched0
            if (
                sched is not None
                and sched0 is not None
                and age - (sched[1] - sched0[1]) < (self.threshold)
            ):
                return  # so far mostly CPU starvation
            hold.confirmed = True
        stalls = 0 if hold.counted else 1
        hold.counted = True
        seconds = now - hold.booked_until
        hold.booked_until = now
        self._events.booked(hold, stalls, seconds)

    def _loop_frame_outside_handler(self) -> tuple[FrameType | None, bool]:
        """The loop thread's current frame, below the profile's signal handler if it runs in
        it (then True): the handler is loopwatch's, the frame it interrupted the app's."""
        frame = self._frames().get(self.loop_thread_id)
        current, depth = frame, 0
        while current is not None and depth < 8:
            if current.f_code is _HANDLER_CODE:
                return current.f_back, True
            current, depth = current.f_back, depth + 1
        return frame, False

    def _sample(
        self, frame: FrameType | None, age: float, after_call: bool
    ) -> tuple[list[FrameSummary], bool] | None:
        """The loop thread's stack now, read into plain values at once, and whether the loop
        is idle: a frame object is live, and the loop moves on as soon as this thread lets
        the GIL go. Past half the threshold only."""
        if age < self.threshold / 2 or frame is None:
            return None
        return snapshot(frame, after_call), self.is_idle(frame)

    def _add_sample(
        self, hold: Hold, age: float, weight: float, sample: tuple[list[FrameSummary], bool]
    ) -> None:
        stack, idle = sample
        culprit = self._filter.pick(stack)
        hold.culprits[culprit] = hold.culprits.get(culprit, 0.0) + max(weight, 1e-6)
        if hold.idle and not idle:
            hold.idle = False
        if hold.stack is None and age >= self.threshold:
            hold.stack = format_stack(stack)
        if age >= hold.next_long and hold.owner.booked:
            hold.next_long *= 2
            self._events.still_held(hold, age, format_culprit(culprit), format_stack(stack))

    def _close(self, hold: Hold, end: float, now: float) -> None:
        hold.end = end
        self._events.closed(hold, self._verdict(hold, end, now), now)

    def _verdict(self, hold: Hold, end: float, now: float) -> Verdict | None:
        duration = end - hold.start
        confirmed = hold.confirmed  # booked live already: a stall whatever comes next
        if duration < self.threshold and not confirmed:
            return None
        if hold.frozen >= 0.5 * duration and not confirmed:
            # the watchdog could not run, and neither did any thread of the process: paused
            # (SIGSTOP, a frozen container); no code held the loop
            logger.debug("loopwatch: %.3fs hold while the process was paused", duration)
            return None
        gc_seconds, gc_generation, gc_cpu = (
            self._gc_within(hold.start, end) if self._gc_within is not None else (0.0, -1, 0.0)
        )
        collected = gc_seconds >= 0.5 * duration
        if not hold.owner.booked:
            if not collected:
                logger.debug(
                    "loopwatch: %.3fs hold in loopwatch's own code: not the app's", duration
                )
                return None
            # the collector held the loop, on the app's heap: loopwatch's code only made the
            # allocation that came last. The loop served no request of the app: <background>
            hold.owner, hold.label = BACKGROUND_OWNER, BACKGROUND_OWNER.label
        if (
            hold.owner.background
            and hold.idle
            and not confirmed
            and not (collected and gc_cpu >= 0.5 * gc_seconds)
        ):
            # every stack sample showed the loop idle, or none was taken (the whole process
            # was starved or paused, the watchdog too): a late heartbeat, not code. Unless the
            # collector ran, on its CPU (a collection on a thread that waited for a core is
            # starvation too): it keeps the GIL, so the watchdog looks only once the loop is
            # back in its selector, and sees it idle after a collection that held it
            logger.debug("loopwatch: %.3fs late heartbeat with no code seen: not a stall", duration)
            return None
        kind = "wait"
        cpu_seconds = 0.0
        within = hold.within
        if within is None or within[0] > end:  # a hold too short to have been read inside
            within = self.probes.figures(now)
        until, cpu_now, sched_now = within
        wall = until - hold.cpu_t0  # the part of the hold the CPU figures cover
        if sched_now is not None and hold.sched0 is not None:
            on_cpu, starved = (b - a for a, b in zip(hold.sched0, sched_now, strict=True))
            if duration - starved < self.threshold and not confirmed:
                # runnable but not scheduled: the machine was busy, the code did not block
                logger.debug("loopwatch: %.3fs hold was CPU starvation, not a stall", duration)
                return None
            cpu_seconds = on_cpu
            if wall > starved and on_cpu >= 0.5 * (wall - starved):
                kind = "cpu"
        elif cpu_now is not None and hold.cpu0 is not None:
            cpu_seconds = cpu_now - hold.cpu0
            if wall > 0 and cpu_seconds >= 0.5 * wall:
                kind = "cpu"
        if collected:
            kind = "gc"  # the collector, holding the GIL, whatever line allocated last
        elif hold.gil >= 0.5 * duration:
            kind = "gil"  # the loop thread computed and nobody else could run: one C call
        return Verdict(
            kind=kind,
            duration=duration,
            cpu_seconds=cpu_seconds,
            culprit=hold.culprit(),
            stack=hold.stack or "",
            booked=hold.booked_until - hold.start if hold.counted else 0.0,
            counted=hold.counted,
            gc_seconds=gc_seconds,
            gc_generation=gc_generation,
        )
