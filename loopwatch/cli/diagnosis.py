"""The diagnosis: per route, how long it held the loop, where, and how to fix it."""

from __future__ import annotations

import ast
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loopwatch.cli.output import MAX_CELL, Output
from loopwatch.cli.scrape import RingStall, Snapshot
from loopwatch.frames import CodeFilter
from loopwatch.names import clip
from loopwatch.stall import outside_requests

__all__ = [
    "LoopTime",
    "RouteDiagnosis",
    "diagnose",
    "fix_hint",
    "loop_fix_hint",
    "loop_time",
    "print_diagnosis",
    "short_culprit",
    "short_path",
]

# A route "eats the loop" without stalling it when it has at least this share of the loop's
# busy time and costs the loop at least this much per request: framework work alone is well
# under a millisecond, so a busy route that is merely popular is not flagged.
EATS_SHARE = 0.2
EATS_PER_REQUEST = 0.002  # seconds

# characters shown of a route and of a culprit (its end: the file, line and function)
ROUTE_WIDTH = 60
CULPRIT_WIDTH = 80
HINT_WIDTH = 240

Key = tuple[str, str]


@dataclass
class LoopTime:
    """The loop's busy time that the loop % column divides, and over what window."""

    busy: dict[Key, float]  # seconds per (method, route) in the window
    window: str  # "since the app started", "over the last 2.0s (...)"
    wall: float | None  # seconds between the two scrapes; None for one scrape
    # event loops whose loop time is measured (workers add up); 1 for a source without
    # loopwatch_event_loops
    loops: float = 1.0
    sampled: bool = False  # some loop is sampled (uvloop before 3.12): short holds read low

    @property
    def total(self) -> float:
        return sum(self.busy.values())

    @property
    def utilization(self) -> float | None:
        """Busy seconds per wall second per loop (Node's ELU), 0..1: needs two scrapes."""
        return self.total / self.wall / self.loops if self.wall else None


def _timed_loops(snapshot: Snapshot) -> tuple[float, bool]:
    """(event loops with loop time measured, whether any is sampled) at ``snapshot``."""
    loops = snapshot.expo.loops
    timed = loops.get("exact", 0.0) + loops.get("sampled", 0.0)
    return (timed if timed >= 1 else 1.0), loops.get("sampled", 0.0) > 0


def loop_time(
    snapshot: Snapshot, previous: Snapshot | None = None, window: str | None = None
) -> LoopTime | None:
    """Busy seconds per route: since start for one scrape, or the difference of two scrapes
    of the same app (``previous`` earlier). None when the source has no loop-time metric."""
    now = snapshot.expo.busy
    if not now:
        return None
    if (
        previous is not None
        and previous.expo.busy
        and snapshot.taken is not None
        and previous.taken is not None
        and snapshot.taken > previous.taken
    ):
        delta = {k: v - previous.expo.busy.get(k, 0.0) for k, v in now.items()}
        if all(d >= -1e-6 for d in delta.values()):  # else a counter went back: a restart
            wall = snapshot.taken - previous.taken
            label = window or f"over the last {wall:.1f}s (difference of two scrapes)"
            loops, sampled = _timed_loops(snapshot)
            # a worker that left within the window still counted its share: the larger count
            loops = max(loops, _timed_loops(previous)[0])
            busy = {k: max(d, 0.0) for k, d in delta.items()}
            return LoopTime(busy, label, wall, loops, sampled)
    loops, sampled = _timed_loops(snapshot)
    return LoopTime(dict(now), "since the app started", None, loops, sampled)


@dataclass
class RouteDiagnosis:
    method: str
    route: str
    requests: int
    stalls: int
    blocked: float  # seconds
    kind: str  # "cpu", "gil", "gc", "wait", joined by "+" (most seconds first), or "-"
    worst: float | None  # longest stall still in the ring
    culprit: str  # "path:line in function" or "-"
    hint: str
    busy: float | None = None  # loop seconds in the loop-time window; None: not measured
    share: float | None = None  # of the loop's busy time in the window, 0..1
    per_request: float | None = None  # loop seconds per request, since start

    @property
    def label(self) -> str:
        return f"{self.method} {self.route}" if self.method != "-" else self.route

    @property
    def eats_loop(self) -> bool:
        """No stall, yet a large share of the loop at a cost per request no framework has."""
        return (
            self.stalls == 0
            and self.method != "-"
            and (self.share or 0.0) >= EATS_SHARE
            and (self.per_request or 0.0) >= EATS_PER_REQUEST
        )


_FRAME = re.compile(r'^\s*File "(?P<path>.+)", line (?P<line>\d+), in (?P<func>.+)$', re.MULTILINE)


def _app_frames(stack: str, code: CodeFilter) -> list[tuple[str, int, str]]:
    frames = [(m["path"], int(m["line"]), m["func"]) for m in _FRAME.finditer(stack)]
    return [f for f in frames if code.is_app(f[0])]


def _awaits_inside(path: str, function: str, line: int) -> bool | None:
    """Whether the ``async def`` around ``path:line`` awaits anything; None if unknown."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.AsyncFunctionDef)
            and node.name == function
            and node.lineno <= line <= (node.end_lineno or node.lineno)
        ):
            todo: list[ast.AST] = list(node.body)
            while todo:
                child = todo.pop()
                if isinstance(child, ast.Await | ast.AsyncFor | ast.AsyncWith):
                    return True
                if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    todo.extend(ast.iter_child_nodes(child))
            return False
    return None


def fix_hint(kind: str, route: str, ring: Sequence[RingStall], code: CodeFilter) -> str:
    """One line on how to stop this route blocking the loop."""
    kinds = kind.split("+")  # by seconds, most first
    if kinds[0] == "gc":
        return (
            "the garbage collector held the loop: keep fewer long-lived objects, or "
            "gc.freeze() after start-up so collections skip them"
        )
    if "gil" in kinds:
        return (
            "one call kept the GIL: a thread will not help (the loop waits for the GIL); "
            "run it in a process pool (await loop.run_in_executor(ProcessPoolExecutor(), fn)) "
            "or do less per call"
        )
    # a CPU-bound function only looks like "wait" when other processes take the core from it
    if "cpu" in kinds:
        return (
            "CPU-bound: a thread frees the loop only for code that lets the GIL go (bcrypt, "
            "hashlib, zlib); for Python code use a process pool "
            "(await loop.run_in_executor(ProcessPoolExecutor(), fn))"
        )
    if outside_requests(route):
        return "code outside requests: await asyncio.to_thread(fn) for the blocking call"
    generic = "declare the endpoint `def`, or `await run_in_threadpool(fn)` the blocking call"
    stacks = [s.stack for s in ring]
    frames = _app_frames(stacks[-1], code) if stacks else []
    if not frames:
        return generic
    endpoint, culprit = frames[0], frames[-1]
    awaits = _awaits_inside(endpoint[0], endpoint[2], endpoint[1])
    if awaits is None:
        return generic
    if not awaits:
        return f"declare {endpoint[2]}() `def` (it awaits nothing): FastAPI runs it in a threadpool"
    callee = culprit[2] if culprit[2] != endpoint[2] else "fn"
    return f"{endpoint[2]}() awaits, keep it async: `await run_in_threadpool({callee})`"


_WHERE = re.compile(r"^(?P<path>.+):(?P<line>\d+) in (?P<func>[^ ]+)")


def loop_fix_hint(culprit: str) -> str:
    """How to stop a route eating the loop without a stall, from its culprit
    ("path:line in function") when known."""
    generic = (
        "move its sync work off the loop: declare the endpoint `def`, or "
        "`await run_in_threadpool(fn)`; or use an async library for the call"
    )
    m = _WHERE.match(culprit)
    if m is None:
        return generic
    path = m["path"] if os.path.isabs(m["path"]) else os.path.join(os.getcwd(), m["path"])
    awaits = _awaits_inside(path, m["func"], int(m["line"]))
    if awaits is None:
        return generic
    if not awaits:
        return (
            f"declare {m['func']}() `def` (it awaits nothing): FastAPI runs it in a "
            "threadpool, off the loop"
        )
    return f"{m['func']}() awaits, keep it async: `await run_in_threadpool(fn)` for the sync work"


def short_culprit(culprit: str, width: int = CULPRIT_WIDTH) -> str:
    """ "path:line in function" in ``width`` characters: the function cut at its end, the
    path at its start (its file name and the line stay)."""
    m = _CULPRIT.match(culprit)
    if m is None:
        return clip(culprit, width, tail=True)
    where = f":{m['line']} in {clip(m['func'], width // 3)}"
    return clip(m["path"], max(width - len(where), 8), tail=True) + where


_CULPRIT = re.compile(r"^(?P<path>.+):(?P<line>\d+) in (?P<func>.+)$", re.DOTALL)


def short_path(culprit: str, cwd: str | None = None) -> str:
    """The culprit with its path relative to the working directory when it is under it."""
    base = os.path.join(cwd or os.getcwd(), "")
    return culprit[len(base) :] if culprit.startswith(base) else culprit


def diagnose(
    snapshot: Snapshot,
    code: CodeFilter | None = None,
    loop: LoopTime | None = None,
    locations: dict[Key, str] | None = None,
    endpoints: dict[Key, str] | None = None,
) -> list[RouteDiagnosis]:
    """Every route seen, sorted by share of the loop's busy time in ``loop``'s window when
    known (so a route that eats the loop without a stall comes up), then by seconds blocked,
    stalls, requests. ``locations``: where each route's endpoint is ("path:line in
    function"), shown as the culprit of a route that eats the loop without a stall: its top
    line in the loop profile, or its endpoint; ``endpoints``: where each endpoint function is,
    for the fix hint."""
    code = CodeFilter() if code is None else code
    expo = snapshot.expo
    ring_by_route: dict[tuple[str, str], list[RingStall]] = defaultdict(list)
    for stall in snapshot.stalls:
        ring_by_route[stall.method, stall.route].append(stall)
    rows = []
    # declared routes have a busy series at 0 from start-up: only those that used the loop
    used = {k for k, v in expo.busy.items() if v > 0}
    for key in set(expo.requests) | set(expo.stalls) | used:
        method, route = key
        kinds = {k: v for k, v in expo.stalls.get(key, {}).items() if v[0] > 0}
        stalls = int(sum(v[0] for v in kinds.values()))
        blocked = sum(v[1] for v in kinds.values())
        kind = "+".join(sorted(kinds, key=lambda k: -kinds[k][1])) if kinds else "-"
        ring = ring_by_route.get(key, [])
        worst = max((s.duration for s in ring), default=None)
        weights: dict[str, float] = defaultdict(float)
        for s in ring:
            weights[s.culprit] += s.duration
        top = max(weights, key=weights.__getitem__) if weights else None
        culprit = short_path(top) if top else "-"
        if stalls:
            matching = [s for s in ring if s.culprit == top]
            hint = fix_hint(kind, route, matching, code)
        else:
            hint = ""
        requests = int(expo.requests.get(key, 0))
        row = RouteDiagnosis(method, route, requests, stalls, blocked, kind, worst, culprit, hint)
        if loop is not None:
            row.busy = loop.busy.get(key, 0.0)
            row.share = row.busy / loop.total if loop.total > 0 else 0.0
            if requests:
                row.per_request = expo.busy.get(key, 0.0) / requests
            if row.eats_loop:
                where = (locations or {}).get(key)
                if where is not None:
                    row.culprit = short_path(where)
                row.hint = loop_fix_hint((endpoints or {}).get(key) or where or "")
        rows.append(row)
    rows.sort(
        key=lambda r: (-(r.share or 0.0), -r.blocked, -r.stalls, -r.requests, r.route, r.method)
    )
    return rows


def _share(r: RouteDiagnosis) -> str:
    if r.share is None:
        return "-"
    if 0 < r.share < 0.005:
        return "<1%"
    return f"{r.share:.0%}"


def print_diagnosis(
    out: Output,
    snapshot: Snapshot,
    rows: Sequence[RouteDiagnosis],
    loop: LoopTime | None = None,
) -> None:
    ring = f" and its stall ring ({snapshot.ring_source})" if snapshot.ring_source else ""
    title = f"loopwatch's diagnosis, read from {snapshot.source}{ring}"
    table_rows = [
        [
            clip(r.label, ROUTE_WIDTH),
            str(r.requests),
            str(r.stalls),
            f"{r.blocked:.2f}",
            f"{r.worst:.2f}" if r.worst is not None else "-",
            r.kind,
            _share(r),
            short_culprit(r.culprit) if r.stalls or r.eats_loop else "-",
        ]
        for r in rows
    ]
    styles = ["bold red" if r.stalls else "bold yellow" if r.eats_loop else "green" for r in rows]
    out.table(
        title,
        ["route", "requests", "stalls", "blocked s", "worst s", "kind", "loop %", "culprit"],
        table_rows,
        right=(1, 2, 3, 4, 6),
        row_styles=styles,
        widths=(ROUTE_WIDTH, *[MAX_CELL] * 6, CULPRIT_WIDTH),
    )
    total = sum(r.blocked for r in rows)
    stalls = sum(r.stalls for r in rows)
    out.line()
    summary = f"The event loop was blocked {total:.2f}s in {stalls} stall(s)"
    if snapshot.expo.current_stall > 0:
        summary += f"; blocked right now for {snapshot.expo.current_stall:.2f}s"
    out.line(summary + ".")
    if loop is None:
        out.line(
            "Loop time: not at this source (no loopwatch_event_loop_busy_seconds_total: a "
            "loopwatch before loop-time accounting, or loop_time off); loop % shows '-'."
        )
    else:
        text = f"The loop ran code {loop.total:.2f}s {loop.window}; loop % is each route's share"
        utilization = loop.utilization
        if utilization is not None:
            per = f" / {loop.loops:g} event loops" if loop.loops != 1 else ""
            text += f". Loop utilization: {utilization:.0%} (busy / wall seconds{per})."
        else:
            text += ". Loop utilization needs two scrapes (report --watch)."
        if loop.sampled:
            text += (
                " Loop time is sampled here (uvloop before Python 3.12): holds of a few ms "
                "are mostly missed, so it reads low."
            )
        out.line(text)
    for note in snapshot.notes:
        out.line(note)
    if not snapshot.stalls and stalls and not snapshot.notes:
        out.line("(no stall ring at this source: culprits show as '-')")
    fixes = [r for r in rows if r.stalls or r.eats_loop]
    if fixes:
        out.line()
        out.line("How to fix:")
        labels = [clip(r.label, ROUTE_WIDTH) for r in fixes]
        width = max(len(label) for label in labels)
        for r, label in zip(fixes, labels, strict=True):
            hint = r.hint
            if not r.stalls and loop is not None:
                per = f", {(r.per_request or 0) * 1000:.1f} ms of loop per request"
                hint = f"0 stalls, {r.share or 0:.0%} of the loop {loop.window}{per}: {hint}"
            out.line(f"  {label:<{width}}  {clip(hint, HINT_WIDTH)}", style="yellow")
