"""What a stall was charged to (a test's phase and fixture), and how it is printed."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from loopwatch.frames import CodeFilter
from loopwatch.stall import BACKGROUND, Stall, outside_requests

__all__ = ["Context", "Record", "StallFailure"]

# the plugin's wrapper of ``run_forever``: a culprit there is a C callback of the loop's
_LOOPS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loops.py")


@dataclass(frozen=True)
class Context:
    """What pytest is running: a test's phase, and the fixture being set up, if any."""

    nodeid: str
    phase: str  # setup, call or teardown
    fixture: str | None
    fixture_scope: str | None
    threshold: float
    allow: bool

    def describe(self) -> str:
        if self.fixture is not None:
            return f"{self.phase} of fixture {self.fixture!r} ({self.fixture_scope} scope)"
        return self.phase


@dataclass(frozen=True)
class Record:
    """One stall, and what it was charged to."""

    stall: Stall
    context: Context | None  # None: not charged to a test, reported at the end of the run
    loop_thread: str
    loop_owner: str
    threshold: float
    verdict: str  # failed, allowed, below-threshold or gc (reported, not failed)
    worker: str | None = None  # the pytest-xdist worker that ran the loop

    def as_dict(self) -> dict[str, object]:
        ctx = self.context
        return {
            "test": ctx.nodeid if ctx is not None else None,
            "phase": ctx.phase if ctx is not None else None,
            "fixture": ctx.fixture if ctx is not None else None,
            "verdict": self.verdict,
            "threshold": self.threshold,
            "worker": self.worker,
            "loop_thread": self.loop_thread,
            "loop_owner": self.loop_owner,
            **self.stall.as_dict(),
        }

    def lines(self) -> list[str]:
        stall, ctx = self.stall, self.context
        if stall.method == "-" and stall.route == BACKGROUND:
            route = "none recorded (outside any request seen by LoopWatchMiddleware)"
        elif stall.method == "-" and outside_requests(stall.route):
            route = f"{stall.route} (a task outside any request seen by LoopWatchMiddleware)"
        else:
            route = f"{stall.method} {stall.route}"
        during = ctx.describe() if ctx is not None else "no test (see loop)"
        stack = fold_library_frames(stall.stack)
        where = f" of xdist worker {self.worker}" if self.worker is not None else ""
        return [
            f"event loop blocked for {stall.duration:.3f}s (threshold {self.threshold:g}s) "
            f"during {during}",
            f"  route:    {route}",
            f"  culprit:  {stall.culprit}{_C_CALLBACK if blames_the_runner(stall) else ''}",
            f"  kind:     {stall.kind} ({stall.cpu_seconds:.3f}s of CPU on the loop thread"
            f"{_gc_part(stall)}){_KIND_NOTE.get(stall.kind, '')}",
            f"  loop:     thread {self.loop_thread!r}{where}, started during {self.loop_owner}",
            "  loop thread stack (innermost last):",
            *(f"    {line}" for line in stack or ["<not sampled>"]),
        ]


_KIND_NOTE = {
    "gil": " - one call kept the GIL: a thread will not help; a process pool or less work "
    "per call will",
    "gc": " - the garbage collector, not the line that allocated last",
}


def _gc_part(stall: Stall) -> str:
    if stall.gc_seconds < 0.001:
        return ""
    return f"; garbage collection {stall.gc_seconds:.3f}s, generation {stall.gc_generation}"


_C_CALLBACK = " (the loop ran a C function as a callback: no Python frame of its own)"


def blames_the_runner(stall: Stall) -> bool:
    """The innermost Python frame is the loop running a callback (asyncio's ``Handle._run``,
    or this plugin's ``run_forever`` around a C loop): the callback itself is C code, such as
    ``loop.call_soon_threadsafe(time.sleep, 1)``."""
    path, _, where = stall.culprit.rpartition(":")
    return (where.endswith(" in _run") and path.endswith(os.path.join("asyncio", "events.py"))) or (
        where.endswith(" in run_forever") and path == _LOOPS_FILE
    )


_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line \d+, in ')


def fold_library_frames(stack: str) -> list[str]:
    """The stack's lines, with each run of library frames (stdlib, site-packages, pytest)
    folded to one line; the innermost frame is always kept."""
    is_app = CodeFilter().is_app
    frames: list[list[str]] = []
    for line in stack.rstrip("\n").splitlines():
        if _FRAME.match(line) or not frames:
            frames.append([line.strip()])
        else:
            frames[-1].append("  " + line.strip())
    lines: list[str] = []
    folded = 0
    for index, frame in enumerate(frames):
        match = _FRAME.match(frame[0])
        if match and not is_app(match["path"]) and index < len(frames) - 1:
            folded += 1
            continue
        if folded:
            lines.append(f"... {folded} library frame(s) ...")
            folded = 0
        lines.extend(frame)
    return lines


class StallFailure:
    """A report's longrepr: the stalls that failed the phase."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records
        first = records[0].stall
        more = f" (+{len(records) - 1} more)" if len(records) > 1 else ""
        self.reprcrash = Crash(
            f"loopwatch: event loop blocked for {first.duration:.3f}s at {first.culprit}{more}"
        )

    def toterminal(self, tw: Any) -> None:
        for line in str(self).splitlines():
            tw.line(line, red=line.startswith("event loop blocked"))

    def __str__(self) -> str:
        return "\n".join(line for record in self.records for line in record.lines())


@dataclass(frozen=True)
class Crash:
    message: str
