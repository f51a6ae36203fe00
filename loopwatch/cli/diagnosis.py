"""The diagnosis: per route, how long it held the loop, where, and how to fix it."""

from __future__ import annotations

import ast
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loopwatch.attribution import CodeFilter
from loopwatch.cli.output import Output
from loopwatch.cli.scrape import RingStall, Snapshot
from loopwatch.stall import BACKGROUND

__all__ = ["RouteDiagnosis", "diagnose", "fix_hint", "print_diagnosis", "short_path"]


@dataclass
class RouteDiagnosis:
    method: str
    route: str
    requests: int
    stalls: int
    blocked: float  # seconds
    kind: str  # "cpu", "wait", "cpu+wait" or "-"
    worst: float | None  # longest stall still in the ring
    culprit: str  # "path:line in function" or "-"
    hint: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.route}" if self.method != "-" else self.route


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
    # any cpu stall: a CPU-bound function only looks like "wait" when other processes take
    # the core from it, and a thread would not fix it either way
    if "cpu" in kind.split("+"):
        return (
            "CPU-bound: a thread will not help under the GIL; run it in a process pool "
            "(await loop.run_in_executor(ProcessPoolExecutor(), fn))"
        )
    if route == BACKGROUND:
        return "background code: await asyncio.to_thread(fn) for the blocking call"
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


def short_path(culprit: str, cwd: str | None = None) -> str:
    """The culprit with its path relative to the working directory when it is under it."""
    base = os.path.join(cwd or os.getcwd(), "")
    return culprit[len(base) :] if culprit.startswith(base) else culprit


def diagnose(snapshot: Snapshot, code: CodeFilter | None = None) -> list[RouteDiagnosis]:
    """Every route seen, sorted by seconds blocked (then stalls, then requests)."""
    code = CodeFilter() if code is None else code
    expo = snapshot.expo
    ring_by_route: dict[tuple[str, str], list[RingStall]] = defaultdict(list)
    for stall in snapshot.stalls:
        ring_by_route[stall.method, stall.route].append(stall)
    rows = []
    for key in set(expo.requests) | set(expo.stalls):
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
        rows.append(
            RouteDiagnosis(method, route, requests, stalls, blocked, kind, worst, culprit, hint)
        )
    rows.sort(key=lambda r: (-r.blocked, -r.stalls, -r.requests, r.route, r.method))
    return rows


def print_diagnosis(out: Output, snapshot: Snapshot, rows: Sequence[RouteDiagnosis]) -> None:
    ring = f" and its stall ring ({snapshot.ring_source})" if snapshot.ring_source else ""
    title = f"loopwatch's diagnosis, read from {snapshot.source}{ring}"
    table_rows = [
        [
            r.label,
            str(r.requests),
            str(r.stalls),
            f"{r.blocked:.2f}",
            f"{r.worst:.2f}" if r.worst is not None else "-",
            r.kind,
            r.culprit if r.stalls else "-",
        ]
        for r in rows
    ]
    styles = ["bold red" if r.stalls else "green" for r in rows]
    out.table(
        title,
        ["route", "requests", "stalls", "blocked s", "worst s", "kind", "culprit"],
        table_rows,
        right=(1, 2, 3, 4),
        row_styles=styles,
    )
    total = sum(r.blocked for r in rows)
    stalls = sum(r.stalls for r in rows)
    out.line()
    summary = f"The event loop was blocked {total:.2f}s in {stalls} stall(s)"
    if snapshot.expo.current_stall > 0:
        summary += f"; blocked right now for {snapshot.expo.current_stall:.2f}s"
    out.line(summary + ".")
    for note in snapshot.notes:
        out.line(note)
    if not snapshot.stalls and stalls and not snapshot.notes:
        out.line("(no stall ring at this source: culprits show as '-')")
    fixes = [r for r in rows if r.stalls]
    if fixes:
        out.line()
        out.line("How to fix:")
        width = max(len(r.label) for r in fixes)
        for r in fixes:
            out.line(f"  {r.label:<{width}}  {r.hint}", style="yellow")
