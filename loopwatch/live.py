"""The live page's files and its small JSON endpoints, for the side port and ``metrics_app()``.

Both servers call ``serves(path)`` and then ``respond(...)``: the page (``loopwatch/ui/``:
``index.html``, ``app.js``, ``style.css``, served as they are) and four JSON documents the page
polls, every URL relative to the page, so the same files work at the side port's ``/`` and at
``<metrics mount>/ui``:

- ``ui/state.json``: the loops now, one row each: responsive, or blocked for how long, by
  which route, at which line (the watchdog's samples of the hold in progress). Only the side
  port answers while the loop is frozen: ``side_port`` tells the page which one it is talking
  to (the side port's number, or false at the app's own mount). In multiprocess mode every
  live worker's loops (``fleet``), with its pid.
- ``ui/timeline.json?since=T``: one point per second per loop after wall-clock time ``T``
  (lag p99, longest heartbeat delay, utilization) and the stalls that ended in that window.
- ``ui/routes.json``: per route: requests, stalls, seconds blocked, loop share, worst recent
  stall, kind, culprit.
- ``ui/stalls.json``: the newest stalls; ``?stack=T``: the one that started at ``T``, with
  its stack (fetched when the page opens it). In multiprocess mode, every worker's.

With ``code=False`` (``metrics_app(app_endpoints="summary")``) every document leaves out
code locations: stalls carry no culprit or stack, the state and the routes no culprit, and
the page is told there is no profile.

Read-only: nothing here changes any state, and the servers answer 405 to anything but GET
and HEAD. Route templates, paths and function names go out as JSON strings; the page puts
them in the DOM as text only (``textContent``), and its Content-Security-Policy allows no
inline script and no other origin.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry

from loopwatch import fleet
from loopwatch.config import multiprocess_dir
from loopwatch.metrics import book_for
from loopwatch.stall import recent_stalls, without_code
from loopwatch.stats import StatsBook, WatchedLoop
from loopwatch.timeline import KEEP

__all__ = ["Response", "respond", "serves"]

Response = tuple[int, list[tuple[str, str]], bytes]

UI_DIR = Path(__file__).resolve().parent / "ui"
STALLS_SHOWN = 40

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_DATA = ("state.json", "timeline.json", "routes.json", "stalls.json")
# the page loads nothing from anywhere else, runs no inline script, and is framed by nobody
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATUS_LINES = {200: "200 OK", 404: "404 Not Found", 405: "405 Method Not Allowed"}


def _name(path: str, side_port: bool) -> str | None:
    """The file or document ``path`` asks for, or None when it is not the page's."""
    trimmed = path.rstrip("/")
    if trimmed.endswith(("/ui", "/ui/index.html")) or (
        side_port and trimmed in ("", "/index.html")
    ):
        return "index.html"
    head, _, name = trimmed.rpartition("/")
    if head.endswith("/ui") and (name in _STATIC or name in _DATA):
        return name
    return None


def serves(path: str, *, side_port: bool) -> bool:
    """Whether ``path`` is the page or one of its files (cheap: no I/O)."""
    return _name(path, side_port) is not None


def respond(
    registry: CollectorRegistry, path: str, query: bytes, side_port: int | None, code: bool = True
) -> Response:
    """Status, headers and body for one of the page's URLs (``serves(path)`` was true);
    ``side_port``: the side port's number, None at the app's own mount; ``code=False``: no
    culprit, stack, path or line in any of them."""
    name = _name(path, side_port is not None)
    if name in _STATIC:
        headers = [("Content-Type", _STATIC[name]), ("Cache-Control", "no-cache")]
        if name == "index.html":
            headers.append(("Content-Security-Policy", _CSP))
            headers.append(("Referrer-Policy", "no-referrer"))
        return _ok(_static(name), headers)
    book = book_for(registry)
    args = parse_qs(query.decode("latin-1"))
    if name == "state.json":
        doc = state(book, side_port, code)
    elif name == "timeline.json":
        doc = timeline(book, _float(args.get("since"), 0.0), code)
    elif name == "routes.json":
        doc = routes(book, code)
    elif name == "stalls.json":
        doc = stalls(_float(args.get("stack"), -1.0), code)
    else:
        return 404, [("Content-Type", "text/plain"), ("Content-Length", "10")], b"not found\n"
    body = json.dumps(doc, separators=(",", ":")).encode()
    return _ok(body, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])


def _ok(body: bytes, headers: list[tuple[str, str]]) -> Response:
    headers.append(("X-Content-Type-Options", "nosniff"))
    headers.append(("Content-Length", str(len(body))))
    return 200, headers, body


@functools.cache
def _static(name: str) -> bytes:
    return (UI_DIR / name).read_bytes()


@functools.cache
def _has_profile() -> bool:
    """The loop profile (``/profile``, collapsed stacks) is served by this version."""
    return importlib.util.find_spec("loopwatch.profile") is not None


def _float(values: list[str] | None, default: float) -> float:
    try:
        return float(values[-1]) if values else default
    except ValueError:
        return default


def _monitors(book: StatsBook) -> list[WatchedLoop]:
    return [m for m in book.loops() if m.running]


def state(book: StatsBook, side_port: int | None, code: bool = True) -> dict[str, Any]:
    """The loops now: one row per loop (in multiprocess mode, every live worker's: ``pid``,
    and ``age``, how old its figures are), and the one blocked longest."""
    monitors = _monitors(book)
    pid = os.getpid()
    rows = [{"pid": pid, "age": 0.0, **row} for row in fleet.loop_rows(monitors)]
    ring = recent_stalls()
    stalls_seen, last_stall = len(ring), ring[-1].started_at if ring else None
    directory = multiprocess_dir()
    if directory:
        for worker in fleet.workers(directory):
            age = round(worker.age, 3)
            rows += [{"pid": worker.pid, "age": age, **row} for row in worker.loops]
            stalls_seen += worker.stalls
            if worker.last_stall is not None:
                last_stall = max(last_stall or 0.0, worker.last_stall)
    if not code:  # no culprit of a hold in progress either
        rows = [{**row, "blocked": _no_culprit(row["blocked"])} for row in rows]
    blocked: dict[str, Any] | None = None
    for row in rows:
        held = row["blocked"]
        if held is not None and (blocked is None or held["seconds"] > blocked["seconds"]):
            blocked = {**held, "pid": row["pid"]}
    thresholds = [row["threshold"] for row in rows if row["threshold"] is not None]
    return {
        "time": time.time(),
        "side_port": side_port if side_port is not None else False,
        "pid": pid,
        "multiprocess": bool(directory),
        "loops": len(rows),
        "workers": len({row["pid"] for row in rows}),
        "threshold": min(thresholds, default=None),
        "in_flight": sum(row["in_flight"] for row in rows),
        "blocked": blocked,
        "event_loops": rows,
        "stalls_seen": stalls_seen,
        "last_stall": last_stall,
        "profile": code and _has_profile(),  # without code locations, no stacks
        "code": code,
    }


def _no_culprit(held: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if held is None else {**held, "culprit": None}


def recent() -> list[dict[str, Any]]:
    """The recent stalls, oldest first (``Stall.as_dict``); in multiprocess mode every
    worker's, each with its ``pid``. Shared records: copy one before changing it."""
    directory = multiprocess_dir()
    if directory:
        return fleet.stalls(directory)
    return [s.as_dict() for s in recent_stalls()]


def timeline(book: StatsBook, since: float, code: bool = True) -> dict[str, Any]:
    """Points after ``since`` (one a second; several loops: the worst of each second), and
    the stalls that ended up to 5 s before it (a stall is delivered once it has ended; the
    page also takes the marks of older ones from ``stalls.json``)."""
    now = time.time()
    since = max(since, now - KEEP)
    by_second: dict[int, list[Any]] = {}
    for monitor in _monitors(book):
        for t, p99, peak, utilization in monitor.timeline.points(since):
            point = by_second.get(round(t))
            if point is None:
                by_second[round(t)] = [t, p99, peak, utilization]
                continue
            point[1], point[2] = max(point[1], p99), max(point[2], peak)
            if utilization is not None:
                point[3] = max(point[3] or 0.0, utilization)
    points = [
        [p[0], round(p[1], 5), round(p[2], 5), None if p[3] is None else round(p[3], 4)]
        for _, p in sorted(by_second.items())
    ]
    stalls = [
        _stall(s, stack=False, code=code)
        for s in recent()
        if s["started_at"] + s["duration"] > since - 5
    ]
    return {"time": now, "keep": KEEP, "points": points, "stalls": stalls}


def routes(book: StatsBook, code: bool = True) -> dict[str, Any]:
    """One row per route with anything to show (requests, stalls or loop time)."""
    totals = book.totals()
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    for (method, route, _), n in totals.requests.items():
        requests[(method, route)] += n
    kinds: dict[tuple[str, str], dict[str, int]] = {}
    for (method, route, kind), hist in totals.stalls.items():
        kinds.setdefault((method, route), {})[kind] = sum(hist.counts)
    worst: dict[tuple[str, str], float] = {}
    culprits: dict[tuple[str, str], collections.Counter[str]] = {}
    for s in recent():
        key = (s["method"], s["route"])
        worst[key] = max(worst.get(key, 0.0), s["duration"])
        culprits.setdefault(key, collections.Counter())[s["culprit"]] += 1
    busy = totals.busy or {}
    busy_total = sum(busy.values())
    rows = []
    keys = set(totals.stall_time) | set(requests) | set(busy) | set(totals.in_progress)
    for key in sorted(keys):
        stalls, seconds = totals.stall_time.get(key, (0, 0.0))
        loop_time = busy.get(key, 0.0)
        if not (requests[key] or stalls or loop_time > 0.0005 or key in totals.in_progress):
            continue  # a declared route nothing has touched yet
        top = culprits[key].most_common(1) if key in culprits else []
        rows.append(
            {
                "method": key[0],
                "route": key[1],
                "requests": requests[key],
                "stalls": int(stalls),
                "blocked_seconds": round(seconds, 4),
                "loop_seconds": round(loop_time, 4) if totals.busy is not None else None,
                "loop_share": round(loop_time / busy_total, 4) if busy_total > 0 else None,
                "worst": round(worst[key], 4) if key in worst else None,
                "kinds": kinds.get(key, {}),
                "culprit": top[0][0] if top and code else None,
                "blocking_now": round(totals.in_progress[key], 3)
                if key in totals.in_progress
                else None,
            }
        )
    return {
        "time": time.time(),
        "accounted": totals.busy is not None,
        "loop_seconds": round(busy_total, 4),
        "routes": rows,
    }


def stalls(stack_of: float, code: bool = True) -> dict[str, Any]:
    """The newest stalls without their stacks (a stack is a few KB), or the one stall that
    started at ``stack_of`` (its ``started_at``, as the list gave it) with its stack."""
    ring = recent()
    if stack_of >= 0:
        return {
            "stalls": [
                _stall(s, stack=True, code=code) for s in ring if s["started_at"] == stack_of
            ]
        }
    return {"stalls": [_stall(s, stack=False, code=code) for s in ring[::-1][:STALLS_SHOWN]]}


def _stall(s: dict[str, Any], *, stack: bool, code: bool = True) -> dict[str, Any]:
    if not code:
        return without_code(s)
    return s if stack else {k: v for k, v in s.items() if k != "stack"}
