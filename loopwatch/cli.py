"""The command line: ``loopwatch demo`` runs the article's benchmark against the demo app and
prints loopwatch's diagnosis beside it; ``loopwatch report URL`` prints the same diagnosis for
any app's ``/metrics`` (or a saved exposition file).

Nothing in the package imports this module. It needs only the standard library and
prometheus_client; rich (colour, tables, a progress bar) is used when installed, and without a
terminal the output is plain text. The demo app needs fastapi and uvicorn
(``pip install 'loopwatch[demo]'``); the load generator is plain asyncio streams.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loopwatch.attribution import CodeFilter
from loopwatch.stall import BACKGROUND

__all__ = ["main"]

PROG = "loopwatch"


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


# --------------------------------------------------------------------------------------------
# Output: rich when installed (colour on a terminal, plain text otherwise), else plain text.


class Output:
    """Tables, lines and a progress display, through rich if it is installed."""

    def __init__(self, stream: IO[str] | None = None, plain: bool = False) -> None:
        self.stream = sys.stdout if stream is None else stream
        self._console: Any = None
        if not plain and importlib.util.find_spec("rich") is not None:
            from rich.console import Console

            is_tty = self.stream.isatty()
            # In a log nothing wraps: a table row stays one line, whatever COLUMNS says.
            width = None if is_tty else 500
            self._console = Console(file=self.stream, highlight=False, width=width)

    @property
    def is_terminal(self) -> bool:
        return bool(self._console.is_terminal) if self._console is not None else False

    def line(self, text: str = "", style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(text, style=style, markup=False, soft_wrap=not self.is_terminal)
        else:
            print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        if self._console is not None and self.is_terminal:
            self._console.clear()

    def table(
        self,
        title: str,
        headers: Sequence[str],
        rows: Sequence[Sequence[str]],
        right: Sequence[int] = (),
        row_styles: Sequence[str | None] = (),
    ) -> None:
        self.line(title, style="bold")
        if self._console is None:
            print(render_plain_table(headers, rows, right), file=self.stream, flush=True)
            return
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        for i, header in enumerate(headers):
            table.add_column(
                header,
                justify="right" if i in right else "left",
                overflow="fold",
                no_wrap=i == 0 or i in right,  # on a narrow terminal, text columns wrap
            )
        for i, row in enumerate(rows):
            style = row_styles[i] if i < len(row_styles) else None
            table.add_row(*(Text(cell) for cell in row), style=style)
        if self.is_terminal:
            self._console.print(table)
            return
        # no padding to the console's width: trailing spaces only get in the way
        with self._console.capture() as capture:
            self._console.print(table)
        lines = [line.rstrip() for line in capture.get().splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
        print("\n".join(lines), file=self.stream, flush=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        """Yields a function to call once per finished request."""
        if self.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            columns = (
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=self._console) as bar:
                task = bar.add_task(label, total=total)
                yield lambda: bar.advance(task)
            return
        start = time.perf_counter()
        done = 0

        def advance() -> None:
            nonlocal done
            done += 1

        yield advance
        self.line(f"  {label:<22} {done}/{total} requests in {time.perf_counter() - start:.1f}s")


def render_plain_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """A table as plain text, for a terminal without rich."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Reading a loopwatch exposition and the stall ring.


@dataclass
class Exposition:
    """What one scrape says, per (method, route)."""

    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    # (method, route) -> kind -> [stalls, seconds]
    stalls: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    current_stall: float = 0.0
    lag_count: float = 0.0
    has_loopwatch: bool = False


def parse_exposition(text: str, source: str) -> Exposition:
    """Parse Prometheus text (or OpenMetrics) exposition; errors name the source."""
    from prometheus_client.parser import text_string_to_metric_families

    if re.search(r"^# EOF\s*$", text, re.MULTILINE):
        from prometheus_client.openmetrics.parser import (
            text_string_to_metric_families as openmetrics_families,
        )

        parse: Callable[[str], Any] = openmetrics_families
    else:
        parse = text_string_to_metric_families
    expo = Exposition()
    try:
        for family in parse(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, float(sample.value)
                if not name.startswith("loopwatch_"):
                    continue
                expo.has_loopwatch = True
                key = (labels.get("method", "-"), labels.get("route", "-"))
                if name == "loopwatch_requests_total":
                    expo.requests[key] = expo.requests.get(key, 0.0) + value
                elif name.startswith("loopwatch_stall_duration_seconds_"):
                    suffix = name.rsplit("_", 1)[1]
                    if suffix in ("count", "sum"):
                        kinds = expo.stalls.setdefault(key, {})
                        pair = kinds.setdefault(labels.get("kind", "-"), [0.0, 0.0])
                        pair[0 if suffix == "count" else 1] += value
                elif name == "loopwatch_current_stall_seconds":
                    expo.current_stall = value
                elif name == "loopwatch_event_loop_lag_seconds_count":
                    expo.lag_count = value
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on bad input
        raise CliError(f"{source} is not a Prometheus text exposition ({exc})") from None
    return expo


def _fetch(url: str, timeout: float) -> tuple[str, str]:
    """(body, content type) of GET url; a one-line CliError when it does not answer 200."""
    request = urllib.request.Request(
        url, headers={"Accept": "text/plain;version=0.0.4", "User-Agent": PROG}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8", errors="replace")
            return body, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise CliError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        raise CliError(f"cannot read {url}: {exc}") from None


def _metrics_url(url: str) -> str:
    """A bare ``http://host:port`` means the usual ``/metrics`` path."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/metrics"))
    return url


@dataclass
class Snapshot:
    source: str
    expo: Exposition
    stalls: list[dict[str, Any]]  # the stall ring; empty when the source has none
    ring_source: str | None


def load_snapshot(source: str, timeout: float = 5.0) -> Snapshot:
    """Read a ``/metrics`` URL (and its ``/stalls`` ring) or a saved exposition file."""
    if source.startswith(("http://", "https://")):
        url = _metrics_url(source)
        text, _ = _fetch(url, timeout)
        expo = parse_exposition(text, url)
        if not expo.has_loopwatch:
            raise CliError(
                f"{url} answered, but without loopwatch metrics (no loopwatch_* samples): "
                "is LoopWatchMiddleware installed and metrics_app() mounted there?"
            )
        ring_url = url.split("?", 1)[0].rstrip("/") + "/stalls"
        ring: list[dict[str, Any]] = []
        try:
            body, content_type = _fetch(ring_url, timeout)
            if "json" in content_type:
                data = json.loads(body)
                ring = [s for s in data if isinstance(s, dict)] if isinstance(data, list) else []
        except (CliError, ValueError):
            pass  # an older loopwatch or another exporter: culprits show as "-"
        return Snapshot(url, expo, ring, ring_url if ring else None)
    path = Path(source)
    if not path.exists() and re.fullmatch(
        r"[\w.\-]+:\d+(/.*)?|\[[0-9a-fA-F:.]+\]:\d+(/.*)?", source
    ):
        return load_snapshot("http://" + source, timeout)  # host:port, as curl reads it
    if not path.is_file():
        raise CliError(
            f"{source!r} is neither an http(s) URL nor a readable file "
            "(expected e.g. http://127.0.0.1:8000/metrics or a saved exposition file)"
        )
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror or exc}") from None
    expo = parse_exposition(text, source)
    if not expo.has_loopwatch:
        raise CliError(f"{source} has no loopwatch metrics (no loopwatch_* samples)")
    return Snapshot(source, expo, [], None)


# --------------------------------------------------------------------------------------------
# The diagnosis: per route, how long it held the loop, where, and how to fix it.


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


def fix_hint(kind: str, route: str, ring: Sequence[dict[str, Any]], code: CodeFilter) -> str:
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
    stacks = [str(s.get("stack", "")) for s in ring]
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
    ring_by_route: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for stall in snapshot.stalls:
        key = (str(stall.get("method", "-")), str(stall.get("route", "-")))
        ring_by_route[key].append(stall)
    rows = []
    for key in set(expo.requests) | set(expo.stalls):
        method, route = key
        kinds = {k: v for k, v in expo.stalls.get(key, {}).items() if v[0] > 0}
        stalls = int(sum(v[0] for v in kinds.values()))
        blocked = sum(v[1] for v in kinds.values())
        kind = "+".join(sorted(kinds, key=lambda k: -kinds[k][1])) if kinds else "-"
        ring = ring_by_route.get(key, [])
        worst = max((float(s.get("duration", 0.0)) for s in ring), default=None)
        weights: dict[str, float] = defaultdict(float)
        for s in ring:
            weights[str(s.get("culprit", "-"))] += float(s.get("duration", 0.0))
        top = max(weights, key=weights.__getitem__) if weights else None
        culprit = short_path(top) if top else "-"
        if stalls:
            matching = [s for s in ring if s.get("culprit") == top]
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
    if not snapshot.stalls and stalls:
        out.line("(no stall ring at this source: culprits show as '-')")
    fixes = [r for r in rows if r.stalls]
    if fixes:
        out.line()
        out.line("How to fix:")
        width = max(len(r.label) for r in fixes)
        for r in fixes:
            out.line(f"  {r.label:<{width}}  {r.hint}", style="yellow")


# --------------------------------------------------------------------------------------------
# `loopwatch report`


def run_report(args: argparse.Namespace, out: Output) -> int:
    if not args.watch:
        snapshot = load_snapshot(args.source, args.timeout)
        print_diagnosis(out, snapshot, diagnose(snapshot))
        return 0
    code = CodeFilter()
    refreshes = 0
    try:
        while True:
            try:
                snapshot = load_snapshot(args.source, args.timeout)
            except CliError as exc:
                if refreshes == 0:
                    raise
                out.line(f"{time.strftime('%H:%M:%S')}  {exc}", style="red")
            else:
                out.clear()
                out.line(
                    f"{time.strftime('%H:%M:%S')}  refreshing every {args.interval:g}s "
                    "(Ctrl-C to stop)",
                    style="dim",
                )
                print_diagnosis(out, snapshot, diagnose(snapshot, code))
            refreshes += 1
            if args.count and refreshes >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------------------------
# `loopwatch demo`: the article's benchmark, with a built-in load generator.


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    role: str  # "fake-async" (blocks the loop), "fix", or "async" (really asynchronous)
    what: str
    twin: str | None = None  # for a fix: the fake-async endpoint it fixes


ENDPOINTS = (
    Endpoint("GET", "/sync", "fix", "def, threadpool", "/async"),
    Endpoint("GET", "/async", "fake-async", "async def, blocks"),
    Endpoint("POST", "/my-route-sync", "fix", "def, threadpool", "/my-route"),
    Endpoint("POST", "/my-route", "fake-async", "async def, blocks"),
    Endpoint("GET", "/mixed-fast", "fix", "run_in_threadpool", "/mixed"),
    Endpoint("POST", "/mixed", "fake-async", "async def, blocks"),
    Endpoint("GET", "/async-sleep", "async", "async def, awaits"),
    Endpoint("GET", "/cpu", "fake-async", "async def, CPU"),
)
_BY_PATH = {e.path: e for e in ENDPOINTS}

# The article's published figures (ApacheBench, 300 requests, concurrency 100).
ARTICLE = {"/sync": "60/s, 0.8s", "/async": "1.98/s, 31s", "/mixed-fast": "20x /mixed"}


@dataclass
class LoadResult:
    endpoint: Endpoint
    asked: int  # requests asked for
    sent: int
    ok: int  # 2xx answers
    failed: int  # errors and non-2xx answers
    concurrency: int
    wall: float  # seconds from the first request sent to the last answer
    latencies: list[float]
    capped: bool

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall > 0 else 0.0

    @property
    def time_per_request(self) -> float:
        """ApacheBench's "Time per request (mean)": concurrency x wall time / requests."""
        return self.concurrency * self.wall / self.ok if self.ok else math.inf

    @property
    def mean_latency(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else math.inf


def plan(
    requests: int, concurrency: int, work: float, budget: float, ep: Endpoint
) -> tuple[int, int, bool]:
    """(requests, concurrency, capped) for one endpoint: a fake-async one serves one request
    per ``work`` seconds, so it gets as many as fit in ``budget`` seconds (0: no cap)."""
    if ep.role != "fake-async" or budget <= 0:
        return requests, concurrency, False
    fits = max(1, int(budget / work + 1e-9))  # 0.6 / 0.2 is 2.999...
    if fits >= requests:
        return requests, concurrency, False
    return fits, min(concurrency, fits), True


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """Send one HTTP/1.1 request on a kept-alive connection and read the whole answer;
    returns (status, whether the connection can be reused)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()  # the body runs to the end of the connection
        return status, False
    return status, headers.get("connection") != "close"


async def drive(
    host: str, port: int, ep: Endpoint, requests: int, concurrency: int, on_done: Callable[[], None]
) -> tuple[float, int, list[float]]:
    """Send ``requests`` requests from ``concurrency`` workers, like ``ab -n -c`` with
    keep-alive; returns (wall seconds, 2xx answers, latencies). Plain asyncio streams: an HTTP
    client library costs ~100 times the CPU per request, and the client shares the machine with
    the server it measures."""
    request = (
        f"{ep.method} {ep.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"User-Agent: {PROG}-demo\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    ok = 0
    left = requests

    async def worker() -> None:
        nonlocal ok, left
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                status, reuse = await _exchange(*conn, request)
                ok += 200 <= status < 300
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, ValueError, IndexError):  # fmt: skip
                reuse = False
            latencies.append(time.perf_counter() - started)
            on_done()
            if not reuse and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()
            with contextlib.suppress(OSError):
                await conn[1].wait_closed()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, ok, latencies


def _check_demo_requirements() -> Path:
    """The directory holding ``demo_app``, after checking the demo's dependencies."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(
            f"the demo needs {', '.join(missing)}: pip install 'loopwatch[demo]' "
            "(or run `make demo` in the loopwatch repository)"
        )
    candidates = [Path.cwd(), Path(__file__).resolve().parent.parent]
    for root in candidates:
        if (root / "demo_app" / "main.py").is_file():
            return root
    raise CliError(
        "the demo app (demo_app/) was not found: run `loopwatch demo` from a checkout of the "
        "loopwatch repository (`make demo`)"
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_port(host: str, port: int) -> None:
    with socket.socket() as sock:
        # as uvicorn binds: a port whose last connections are in TIME_WAIT is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CliError(
                f"invalid --port {port}: cannot bind {host}:{port} ({exc.strerror or exc}); "
                "expected a free port, or leave --port out to pick one"
            ) from None


def _wait_until_up(url: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"the demo server exited with status {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise CliError(f"the demo server did not answer at {url} within {timeout:g}s: {_tail(log)}")


def _tail(log: IO[bytes], lines: int = 5) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(no output)"


def _stall_warnings(log: IO[bytes]) -> list[str]:
    log.seek(0)
    text = log.read().decode("utf-8", errors="replace").splitlines()
    return [line for line in text if "event loop blocked for" in line]


def print_benchmark(out: Output, results: Sequence[LoadResult], args: argparse.Namespace) -> None:
    by_path = {r.endpoint.path: r for r in results}
    rows, styles = [], []
    for r in results:
        ep = r.endpoint
        ran = f"{r.ok}/{r.sent} @ {r.concurrency}" + ("*" if r.capped else "")
        if r.failed:
            ran += f", {r.failed} failed"
        twin = by_path.get(ep.twin or "")
        speedup = f"{r.rps / twin.rps:.0f}x {twin.endpoint.path}" if twin and twin.rps else ""
        rows.append(
            [
                f"{ep.method} {ep.path}",
                ep.what,
                ran,
                f"{r.rps:.2f}",
                f"{r.time_per_request:.2f}s",
                f"{r.mean_latency:.2f}s",
                speedup,
                ARTICLE.get(ep.path, ""),
            ]
        )
        styles.append("red" if ep.role == "fake-async" else "green")
    title = (
        f"The article's benchmark, measured here: {args.requests} requests at concurrency "
        f"{args.concurrency}, {args.work_seconds:g}s of blocking work per request"
    )
    out.table(
        title,
        [
            "endpoint",
            "what",
            "ran",
            "req/s",
            "time/req",
            "latency",
            "speed-up",
            "article",
        ],
        rows,
        right=(3, 4, 5),
        row_styles=styles,
    )
    out.line(
        "ran: answered OK / sent @ concurrency. time/req is ApacheBench's 'Time per request "
        "(mean)' = concurrency x wall time / requests; latency is the mean measured time of one "
        "request; speed-up is the fix's req/s over its fake-async twin's."
    )
    if any(r.capped for r in results):
        out.line(
            f"* capped: a fake-async endpoint serves one request per {args.work_seconds:g}s, so it "
            f"got as many as fit in --budget {args.budget:g}s (--budget 0 runs them all); its "
            "req/s does not depend on the count."
        )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt here, so the demo server is stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(args: argparse.Namespace, out: Output) -> int:
    with _terminate_as_interrupt():
        return _run_demo(args, out)


def _run_demo(args: argparse.Namespace, out: Output) -> int:
    root = _check_demo_requirements()
    host = "127.0.0.1"
    if args.port:
        _check_port(host, args.port)
    port = args.port or _free_port(host)
    base = f"http://{host}:{port}"
    env = {**os.environ, "DEMO_WORK_SECONDS": repr(args.work_seconds)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "demo_app.main:app",
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    out.line(
        f"Starting the demo app: python {' '.join(command[1:])} (DEMO_WORK_SECONDS={args.work_seconds:g})"
    )
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_up(base + "/metrics", proc, log, timeout=30)
            out.line(f"Serving at {base}; loopwatch metrics at {base}/metrics")
            out.line()
            results = []
            for path in args.endpoints:
                ep = _BY_PATH[path]
                n, c, capped = plan(
                    args.requests, args.concurrency, args.work_seconds, args.budget, ep
                )
                with out.progress(f"{ep.method} {ep.path}", n) as advance:
                    wall, ok, latencies = asyncio.run(drive(host, port, ep, n, c, advance))
                results.append(
                    LoadResult(ep, args.requests, n, ok, n - ok, c, wall, latencies, capped)
                )
            out.line()
            print_benchmark(out, results, args)
            out.line()
            snapshot = load_snapshot(base + "/metrics", timeout=30)
            print_diagnosis(out, snapshot, diagnose(snapshot))
            warnings = _stall_warnings(log)
            if warnings:
                out.line()
                out.line(
                    f"The app logged {len(warnings)} WARNING line(s) on logger 'loopwatch', e.g.:"
                )
                out.line("  " + warnings[0].strip())
            if args.serve:
                out.line()
                out.line(
                    f"Still serving: {base} (metrics at {base}/metrics, stalls at "
                    f"{base}/metrics/stalls). Ctrl-C to stop."
                )
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


# --------------------------------------------------------------------------------------------
# Arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number >= 1")
    return value


def _seconds(minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            expected = f"a number of seconds {'>' if strict else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a port from 1 to 65535 (0: pick a free one)"
        )
    return value


def _endpoints(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    paths = [n if n.startswith("/") else "/" + n for n in names]
    unknown = [p for p in paths if p not in _BY_PATH]
    if unknown or not paths:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a comma-separated list of {', '.join(_BY_PATH)}"
        )
    return list(dict.fromkeys(paths))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Find the code that freezes an asyncio web server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run the article's benchmark against the demo app, with loopwatch's diagnosis",
        description="Start the demo app, load each endpoint like ApacheBench, print the "
        "measured table beside the article's figures, then loopwatch's diagnosis.",
    )
    demo.add_argument(
        "--requests",
        type=_positive_int,
        default=300,
        help="requests per endpoint (default 300, as in the article)",
    )
    demo.add_argument(
        "--concurrency",
        type=_positive_int,
        default=100,
        help="requests in flight at once (default 100)",
    )
    demo.add_argument(
        "--work-seconds",
        type=_seconds(0, strict=True),
        default=0.5,
        help="seconds of blocking work per request (default 0.5)",
    )
    demo.add_argument(
        "--budget",
        type=_seconds(0, strict=False),
        default=15.0,
        help="seconds each fake-async endpoint may take: its request count is capped to fit (default 15; 0: no cap)",
    )
    demo.add_argument(
        "--endpoints",
        type=_endpoints,
        default=[e.path for e in ENDPOINTS],
        help=f"comma-separated, in order (default: {','.join(_BY_PATH)})",
    )
    demo.add_argument(
        "--port", type=_port, default=0, help="port on 127.0.0.1 (default: a free one)"
    )
    demo.add_argument("--serve", action="store_true", help="keep the app running afterwards")
    demo.add_argument("--plain", action="store_true", help="no colour, tables or progress bar")

    report = commands.add_parser(
        "report",
        help="print loopwatch's diagnosis from an app's /metrics or a saved exposition file",
        description="Read a loopwatch /metrics endpoint (and its /stalls ring for culprits) or "
        "a Prometheus text file, and print per route: stalls, seconds blocked, culprit, fix.",
    )
    report.add_argument(
        "source", help="http(s) URL of /metrics (a bare host:port means /metrics), or a file"
    )
    report.add_argument("--watch", action="store_true", help="refresh like top until Ctrl-C")
    report.add_argument(
        "--interval",
        type=_seconds(0.1, strict=False),
        default=2.0,
        help="seconds between refreshes with --watch (default 2)",
    )
    report.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        help="with --watch: stop after this many refreshes",
    )
    report.add_argument(
        "--timeout",
        type=_seconds(0, strict=True),
        default=5.0,
        help="seconds to wait for an answer (default 5)",
    )
    report.add_argument("--plain", action="store_true", help="no colour or table borders")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(plain=args.plain)
    try:
        if args.command == "demo":
            return run_demo(args, out)
        return run_report(args, out)
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
