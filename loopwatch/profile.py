"""Sampled loop stacks per route: where inside each route the loop time goes.

At every check the watchdog thread (never the loop) looks at what the loop runs. When it runs
code (the accounting hook says a callback is running; without an exact hook, the loop has a
current task; or a stall is in progress), the watchdog takes the loop thread's stack, drops
the event loop's own frames below the callback (``run_forever``, ``_run_once``,
``Handle._run``, uvloop's entry), so the stack starts at the task or callback, and counts it
under the owner's ``METHOD ROUTE`` in a process-wide ``ProfileStore``.

Each sample counts the milliseconds since the previous check (the watchdog checks every
``interval`` during a stall and up to 2.5 times less often otherwise), so counts are
milliseconds of loop time, comparable across routes and with
``loopwatch_event_loop_busy_seconds_total``. Like any sampler that shares the GIL with the
loop, it sees CPU slices shorter than the switch interval (5 ms) rarely: the per-route totals
of the busy metric are the exact figures, the stacks say where inside a route the time goes.

Output (``collapsed``): one line per (route, stack), ``METHOD ROUTE;frame;...;leaf COUNT``,
root to leaf, frames as ``function (path:line)``: the text flamegraph.pl, speedscope and
py-spy's raw output read. ``;``, line breaks and other control characters in names are
replaced so that a line always parses.

Bounded memory, whatever the app does:

- a rolling window of ``KEEP_SECONDS`` (300) one-second buckets; queries cover the last
  ``seconds`` of them (default ``DEFAULT_SECONDS``, 60);
- at most ``MAX_STACKS`` (100) distinct stacks per second and ``MAX_TOTAL`` (2000) in the
  whole window (each kept once, however many seconds hold it); samples of a new stack beyond
  either go to its route's ``<other stacks>`` line, and beyond ``MAX_OVERFLOW`` (32) such
  lines they are dropped (``ProfileStore.dropped`` counts them);
- at most ``MAX_DEPTH`` (64) frames per stack: the leaf-most ones, under one ``<more frames>``;
- at most ``MAX_NAME`` (200) characters per frame and per route label (the middle of a long
  name is cut, so the function and line stay); a frame's name is made once per code line
  and shared by every stack that holds it.

Measured with every cap reached (``benchmarks/profile_cost.py``): about 3 MiB
(frames shared between stacks, as the sampler makes them).

Standard library only.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from types import CodeType, FrameType
from typing import Any

from loopwatch import cputimer
from loopwatch.accounting import Accountant
from loopwatch.attribute import Owner
from loopwatch.detect import Detector
from loopwatch.frames import line_at
from loopwatch.requests import RequestRecord
from loopwatch.stall import OWN

__all__ = [
    "DEFAULT_SECONDS",
    "KEEP_SECONDS",
    "PROFILE",
    "LoopSampler",
    "ProfileStore",
    "parse_collapsed",
    "parse_seconds",
]

KEEP_SECONDS = 300
DEFAULT_SECONDS = 60
MAX_STACKS = 100
MAX_TOTAL = 2000
MAX_OVERFLOW = 32
MAX_DEPTH = 64
MAX_NAME = 200
# a watchdog that woke later than this waited for the GIL: its moment is not a fair sample
LATE_CHECK = 0.002
_CALLBACK = object()  # ``LoopSampler._who``: a plain callback holds the loop
# one sample never stands for more than this (a watchdog that was itself held up, a suspend)
MAX_SAMPLE_MS = 1000

OTHER_STACKS = "<other stacks>"
MORE_FRAMES = "<more frames>"

Stack = tuple[str, ...]  # ("METHOD ROUTE", root frame, ..., leaf frame)

_UNSAFE = re.compile(r"[;\x00-\x1f\x7f]")


def clean(name: str, limit: int = MAX_NAME) -> str:
    """A name that cannot break a collapsed line: no ``;``, no control characters, bounded."""
    name = _UNSAFE.sub(lambda m: ":" if m.group() == ";" else " ", name)
    if len(name) > limit:
        keep = limit - 3
        name = name[: keep // 3] + "..." + name[len(name) - (keep - keep // 3) :]
    return name


def route_label(method: str, route: str) -> str:
    """``METHOD ROUTE`` as the first element of a stack: one word each, no separators."""
    method = re.sub(r"[^A-Za-z0-9_-]", "", method).upper() or "-"
    route = re.sub(r"[\s;]", "_", route) or "/"
    return clean(f"{method} {route}")


class ProfileStore:
    """Per-second buckets of stack counts, the last ``keep`` seconds of them. Thread-safe:
    watchdogs add, scrapes read."""

    def __init__(
        self,
        keep: int = KEEP_SECONDS,
        max_stacks: int = MAX_STACKS,
        max_total: int = MAX_TOTAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep = keep
        self.max_stacks = max_stacks
        self._clock = clock
        self.max_total = max_total
        self._buckets: collections.deque[tuple[int, dict[Stack, int]]] = collections.deque()
        # every distinct stack in the window, once: [the stack, how many buckets hold it]
        self._interned: dict[Stack, list[Any]] = {}
        self._lock = threading.Lock()
        self.dropped = 0  # samples not kept: a bucket full even of overflow lines

    def add(self, stack: Stack, weight: int = 1) -> None:
        second = int(self._clock())
        with self._lock:
            buckets = self._buckets
            if not buckets or buckets[-1][0] != second:
                buckets.append((second, {}))
                while buckets and buckets[0][0] <= second - self.keep:
                    self._release(buckets.popleft()[1])
            counts = buckets[-1][1]
            if stack in counts:
                counts[stack] += weight
                return
            interned = self._interned
            if len(counts) >= self.max_stacks or (
                stack not in interned and len(interned) >= self.max_total
            ):
                stack = (stack[0], OTHER_STACKS)
                if stack in counts:
                    counts[stack] += weight
                    return
                if len(counts) >= self.max_stacks + MAX_OVERFLOW or (
                    stack not in interned and len(interned) >= self.max_total + MAX_OVERFLOW
                ):
                    self.dropped += weight
                    return
            entry = interned.get(stack)
            if entry is None:
                entry = interned[stack] = [stack, 0]
            entry[1] += 1  # one more bucket holds it
            counts[entry[0]] = weight  # the interned tuple: buckets share one copy

    def _release(self, counts: dict[Stack, int]) -> None:
        interned = self._interned
        for stack in counts:
            entry = interned[stack]
            entry[1] -= 1
            if not entry[1]:
                del interned[stack]

    def counts(self, seconds: int = DEFAULT_SECONDS) -> dict[Stack, int]:
        """Each stack's count over the last ``seconds`` (the current second included)."""
        since = int(self._clock()) - seconds
        total: dict[Stack, int] = {}
        with self._lock:
            buckets = [counts for second, counts in self._buckets if second > since]
            for counts in buckets:
                for stack, count in counts.items():
                    total[stack] = total.get(stack, 0) + count
        return total

    def completed(self, after: int) -> tuple[int, list[tuple[int, dict[Stack, int]]]]:
        """The current second, and a copy of each bucket of a second that is over and later
        than ``after`` (what a worker publishes for the others, in multiprocess mode)."""
        now = int(self._clock())
        with self._lock:
            return now, [(t, dict(c)) for t, c in self._buckets if after < t < now]

    def collapsed(self, seconds: int = DEFAULT_SECONDS) -> str:
        """The window as collapsed stacks, one ``label;frame;...;leaf COUNT`` line each,
        sorted (so the same profile renders the same text)."""
        return format_collapsed(self.counts(seconds))

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()
            self._interned.clear()
            self.dropped = 0


PROFILE = ProfileStore()


def format_collapsed(counts: dict[Stack, int]) -> str:
    """``label;frame;...;leaf COUNT`` lines, sorted (the same profile renders the same text)."""
    return "".join(f"{';'.join(stack)} {counts[stack]}\n" for stack in sorted(counts))


def parse_seconds(text: str | None, keep: int = KEEP_SECONDS) -> int:
    """The ``seconds`` query parameter: a whole number from 1 to ``keep``; ValueError names it."""
    if text is None:
        return min(DEFAULT_SECONDS, keep)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= keep:
        raise ValueError(
            f"invalid seconds={text!r}: expected a whole number of seconds from 1 to {keep} "
            "(the profile keeps that many)"
        )
    return value


def parse_collapsed(text: str) -> list[tuple[Stack, int]]:
    """Collapsed-stack lines back into (stack, count) pairs; a line that does not parse is
    skipped (comments, blank lines)."""
    pairs = []
    for line in text.splitlines():
        head, _, count = line.rstrip().rpartition(" ")
        if not head or not count.isdigit():
            continue
        pairs.append((tuple(head.split(";")), int(count)))
    return pairs


# -- sampling (watchdog thread) ---------------------------------------------------------------

# The event loop's own frames: the stack of a callback starts above the last of them.
_LOOP_FUNCTIONS = {
    ("base_events.py", "run_forever"),
    ("base_events.py", "_run_once"),
    ("base_events.py", "run_until_complete"),
    ("events.py", "_run"),
    ("runners.py", "run"),
}
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)
_ACCOUNTING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accounting.py")


class LoopSampler:
    """Samples one loop. Where ``cputimer`` can arm a timer on the loop thread's CPU clock
    (Linux, the loop on the main thread), the loop thread samples itself at each tick it
    computes, unbiased, and the watchdog samples only the rest of the loop time (the loop
    thread blocked or asleep inside a callback, where the watchdog sees it as it is). Elsewhere
    the watchdog samples all of it, at every check. The owner of a sample is the one
    ``attribute`` gives a hold (or the exact hook's running callback's)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        detector: Detector,
        accountant: Callable[[], Accountant | None],
        attribute: Callable[[], Owner],
        task_request: Callable[[asyncio.Task[Any], bool], RequestRecord | Owner],
        store: ProfileStore = PROFILE,
    ) -> None:
        self.loop = loop
        self.detector = detector
        self.store = store
        self._accountant = accountant
        self._attribute = attribute
        self._task_request = task_request
        self._last = time.perf_counter()
        # keyed by id(code), the code kept beside to tell a reused id apart: hashing a code
        # object hashes its bytecode and constants, ~0.15 µs, once per frame per sample.
        # A frame's name per (code, bytecode offset), the offsets of one line sharing the
        # line's one string (``_line_names``)
        self._frame_names: dict[tuple[int, int], tuple[CodeType, str]] = {}
        self._line_names: dict[tuple[int, int], str] = {}
        # (method, route) -> its stack label (two regex passes each, at every sample else)
        self._route_labels: dict[tuple[str, str], str] = {}
        self._loop_codes: dict[int, tuple[CodeType, bool]] = {}
        self._timer: cputimer.CpuTimer | None = None
        # the loop thread's own samples, for the watchdog to name and store: (who, the
        # frames' (code, bytecode offset) leaf first, CPU seconds); bounded if the watchdog
        # falls behind
        self._ticks: collections.deque[tuple[object, list[tuple[CodeType, int]], float]] = (
            collections.deque(maxlen=10_000)
        )
        self._carry = 0.0  # the fraction of a millisecond not yet stored

    # -- the loop thread samples itself ---------------------------------------------------

    def start_on_loop(self) -> None:
        """On the loop's thread: arm the CPU-time timer where it can be."""
        self._timer = cputimer.arm(self._on_tick)

    def stop(self) -> None:
        """From any thread; on the main thread (the loop's) the signal's handler is put
        back, even when another thread disarmed the timer first."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.disarm()
        cputimer.restore_handler()

    @property
    def self_sampling(self) -> bool:
        timer = self._timer
        return timer is not None and timer.armed

    def _on_tick(self, frame: FrameType, cpu: float) -> None:
        """On the loop thread, between two bytecodes of what it runs (maybe inside code that
        holds a lock): who runs and where, as plain references, taking no lock. Naming them
        (a route's template is read under a lock) is the watchdog's work."""
        who = self._who(on_loop=True)
        if who is None:
            return
        codes = self._chain(frame)
        if codes:
            self._ticks.append((who, codes, cpu))

    # -- the watchdog's check ---------------------------------------------------------------

    def sample(self, kept_out: float = 0.0) -> None:
        """At a check, due ``kept_out`` seconds ago (the watchdog woke that late)."""
        due = time.perf_counter() - kept_out
        # a sample stands for the time between two due times (the grid the watchdog keeps),
        # not between wake-ups: a wake-up the loop delayed would weigh more
        elapsed, self._last = due - self._last, due
        off_cpu: Callable[[], bool] | None = None
        if self._timer is not None:
            self._store_ticks()
            if not self.self_sampling:
                self._timer = None  # disarmed (it failed, or the process forked): all ours
            elif self.detector.kept_by_gil > LATE_CHECK:
                # the watchdog got the GIL where the loop thread let it go, not when it was
                # due: a biased moment. The loop thread's CPU is the timer's to sample.
                return
            else:
                off_cpu = self._off_cpu_probe()
        detector = self.detector
        accountant = self._accountant()
        start = accountant.start if accountant is not None and accountant.exact else None
        label = self._label(self._who(on_loop=False))
        if label is None:
            return
        frame = detector.loop_frame()
        if frame is None or detector.is_idle(frame):
            return
        if start is not None and accountant is not None and accountant.start != start:
            return  # that callback ended meanwhile: the stack is someone else's
        if off_cpu is not None and not off_cpu():
            return  # the loop thread computes (or waits for the GIL): the timer's time
        frames = self._names(self._chain(frame))
        if not frames:
            return
        weight = min(MAX_SAMPLE_MS, max(1, round(elapsed * 1000)))
        self.store.add((self._route_label(label), *frames), weight)

    def _off_cpu_probe(self) -> Callable[[], bool]:
        """A test, to call a moment later: is the loop thread asleep in a call (a sleep, a
        read, a poll) and was it off its CPU meanwhile? Computing (a C call that let the GIL
        go), or waiting for the GIL this thread holds, the timer's samples hold that time."""
        probes = self.detector.probes
        clock, blocked = probes.cpu, probes.blocked
        if clock is None:
            return lambda: True
        wall, cpu = time.perf_counter(), clock()

        def off() -> bool:
            if blocked is not None and not blocked():
                return False
            return clock() - cpu < 0.5 * (time.perf_counter() - wall)

        return off

    def _who(self, on_loop: bool) -> object:
        """Who runs the loop's code now, read without taking a lock: a placeholder label, the
        request (the exact hook's, or the current task's), a placeholder owner, ``_CALLBACK``
        (a plain callback in a stall: the watchdog attributes it) or None (the loop waits for
        I/O). Read at once: a task's request is gone from it once it is done (3.10/3.11)."""
        accountant = self._accountant()
        if accountant is not None and accountant.exact:
            if accountant.start is not None:
                owner = accountant.owner or accountant.bound
                if owner is None:
                    return accountant.ownerless
                return owner
            if on_loop or not self.detector.stalling:
                return None  # the loop waits for I/O (or runs between callbacks)
        try:
            task = asyncio.current_task(self.loop)
        except RuntimeError:  # the loop closed
            return None
        if task is None:
            return None if on_loop or not self.detector.stalling else _CALLBACK
        return self._task_request(task, on_loop)

    def _label(self, who: object) -> tuple[str, str] | None:
        """(method, route) of ``who``; None when it is none of the app's code. Off the loop
        thread: a route's template is read under a lock."""
        if who is _CALLBACK:
            who = self._attribute()
        if isinstance(who, Owner):  # (a NamedTuple: before the plain labels)
            return who.label if who.booked else None
        if isinstance(who, RequestRecord):
            if who.route == OWN:
                return None  # loopwatch's own work is not the app's profile
            return (who.method, who.owner_route())
        return who if isinstance(who, tuple) else None

    def _store_ticks(self) -> None:
        ticks = self._ticks
        while ticks:
            who, codes, cpu = ticks.popleft()
            label = self._label(who)
            if label is None:
                continue  # loopwatch's own work, or a task that is none of the app's
            weight = cpu * 1000 + self._carry  # CPU the loop thread used: no cap needed
            whole = int(weight)
            self._carry = weight - whole
            if whole:
                self.store.add((self._route_label(label), *self._names(codes)), whole)

    def _route_label(self, label: tuple[str, str]) -> str:
        known = self._route_labels.get(label)
        if known is None:
            if len(self._route_labels) >= 5_000:  # labels are bounded; a bound all the same
                self._route_labels.clear()
            known = self._route_labels[label] = route_label(*label)
        return known

    def _chain(self, frame: FrameType | None) -> list[tuple[CodeType, int]]:
        """(code, bytecode offset) of the frames above the event loop's own, leaf first; no
        more than ``_names`` uses (it keeps the leaf-most ``MAX_DEPTH``). Run in the loop
        thread's signal handler at every tick: the offset, not the line (``f_lineno`` scans
        the line table), and the loop's own code found by id."""
        chain: list[tuple[CodeType, int]] = []
        loop_codes = self._loop_codes
        while frame is not None and len(chain) <= MAX_DEPTH:
            code = frame.f_code
            known = loop_codes.get(id(code))
            if known is not None and known[0] is code:
                if known[1]:
                    break
            elif self._is_loop(code):
                break
            chain.append((code, frame.f_lasti))
            frame = frame.f_back
        return chain

    def _names(self, chain: list[tuple[CodeType, int]]) -> list[str]:
        """(code, bytecode offset) pairs, leaf first, as frame names root to leaf, at most
        ``MAX_DEPTH``."""
        more = len(chain) > MAX_DEPTH
        if more:
            chain = chain[: MAX_DEPTH - 1]
        names = self._frame_names
        frames: list[str] = [MORE_FRAMES] if more else []
        for code, offset in reversed(chain):
            key = (id(code), offset)
            known = names.get(key)
            if known is not None and known[0] is code:
                frames.append(known[1])
                continue
            if len(names) >= 5_000:  # a bound, for code generated at run time
                names.clear()
                self._line_names.clear()
            line = line_at(code, offset)
            name = self._line_names.get((id(code), line))  # the code is in ``names`` then
            if name is None:
                qualname = getattr(code, "co_qualname", code.co_name)
                name = self._line_names[(id(code), line)] = clean(
                    f"{qualname} ({code.co_filename}:{line})"
                )
            names[key] = (code, name)
            frames.append(name)
        return frames

    def _is_loop(self, code: CodeType) -> bool:
        """The event loop's own code (where a sample's stack ends), learnt once per code."""
        path = code.co_filename
        known = (
            code in self.detector.idle_codes
            or (
                os.path.dirname(path) == _ASYNCIO_DIR
                and (os.path.basename(path), code.co_name) in _LOOP_FUNCTIONS
            )
            or (path == _ACCOUNTING_FILE and code.co_name == "_run")
            or f"{os.sep}uvloop{os.sep}" in path
        )
        if len(self._loop_codes) < 10_000:
            self._loop_codes[id(code)] = (code, known)
        return known


def render(seconds: int, store: ProfileStore = PROFILE) -> bytes:
    """The ``/profile`` body (run off the event loop)."""
    return store.collapsed(seconds).encode("utf-8")


def merge(pairs: Iterable[tuple[Stack, int]]) -> dict[Stack, int]:
    total: dict[Stack, int] = {}
    for stack, count in pairs:
        total[stack] = total.get(stack, 0) + count
    return total
