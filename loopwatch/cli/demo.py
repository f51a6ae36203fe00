"""``loopwatch demo``: the article's benchmark against the demo app, with loopwatch's diagnosis
beside it. The demo app needs fastapi and uvicorn (``pip install 'loopwatch[demo]'``)."""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import importlib.util
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from loopwatch.cli.arguments import port_number, positive_int, seconds
from loopwatch.cli.diagnosis import LoopTime, diagnose, loop_time, print_diagnosis
from loopwatch.cli.errors import CliError
from loopwatch.cli.load import Endpoint, LoadResult, drive
from loopwatch.cli.output import Output
from loopwatch.cli.scrape import Deadline, Snapshot, fetch, load_snapshot

__all__ = ["add_parser", "run_demo"]


ENDPOINTS = (
    Endpoint("GET", "/sync", "fix", "def, threadpool", "/async"),
    Endpoint("GET", "/async", "fake-async", "async def, blocks"),
    Endpoint("POST", "/my-route-sync", "fix", "def, threadpool", "/my-route"),
    Endpoint("POST", "/my-route", "fake-async", "async def, blocks"),
    Endpoint("GET", "/mixed-fast", "fix", "run_in_threadpool", "/mixed"),
    Endpoint("POST", "/mixed", "fake-async", "async def, blocks"),
    Endpoint("GET", "/async-sleep", "async", "async def, awaits"),
    Endpoint("GET", "/cpu", "fake-async", "async def, CPU"),
    # the thousand cuts: 10 ms per request never stalls, yet under load it is the loop's time
    Endpoint("GET", "/cuts-fixed", "fix", "def, 10 ms, threadpool", "/cuts", work=0.01),
    Endpoint("GET", "/cuts", "fake-async", "async def, 10 ms sync", work=0.01),
)
_BY_PATH = {e.path: e for e in ENDPOINTS}
# loop % in the diagnosis is over this pair's run, when it runs: since the app started, the
# seconds the other fake-async endpoints held the loop would hide it
CUTS = ("/cuts-fixed", "/cuts")

# The article's published figures (ApacheBench, 300 requests, concurrency 100).
ARTICLE = {"/sync": "60/s, 0.8s", "/async": "1.98/s, 31s", "/mixed-fast": "20x /mixed"}


def plan(
    requests: int, concurrency: int, work: float, budget: float, ep: Endpoint
) -> tuple[int, int, bool]:
    """(requests, concurrency, capped) for one endpoint: a fake-async one serves one request
    per ``work`` seconds, so it gets as many as fit in ``budget`` seconds (0: no cap)."""
    if ep.role != "fake-async" or budget <= 0:
        return requests, concurrency, False
    work = ep.work if ep.work is not None else work
    fits = max(1, int(budget / work + 1e-9))  # 0.6 / 0.2 is 2.999...
    if fits >= requests:
        return requests, concurrency, False
    return fits, min(concurrency, fits), True


def _check_demo_requirements() -> Path:
    """The directory holding ``demo_app``, after checking the demo's dependencies."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(
            f"the demo needs {', '.join(missing)}: pip install 'loopwatch[demo]' "
            "(or run `make demo` in the loopwatch repository)"
        )
    candidates = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in candidates:
        if (root / "demo_app" / "main.py").is_file():
            return root
    raise CliError(
        "the demo app (demo_app/) was not found: run `loopwatch demo` from a checkout of the "
        "loopwatch repository (`make demo`)"
    )


_ROUTE_DECORATORS = {"get", "post", "put", "patch", "delete"}


def route_table(path: Path) -> dict[tuple[str, str], str]:
    """(METHOD, path) -> "file:line in function" of each ``@app.<method>("<path>")`` endpoint
    in the demo app's source: where a route is defined, read without importing the app."""
    table: dict[tuple[str, str], str] = {}
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return table
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for deco in node.decorator_list:
            if (
                isinstance(deco, ast.Call)
                and isinstance(deco.func, ast.Attribute)
                and deco.func.attr in _ROUTE_DECORATORS
                and deco.args
                and isinstance(deco.args[0], ast.Constant)
                and isinstance(deco.args[0].value, str)
            ):
                key = (deco.func.attr.upper(), deco.args[0].value)
                table[key] = f"{path}:{node.lineno} in {node.name} (endpoint)"
    return table


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


def _settled_snapshot(url: str, log: IO[bytes], timeout: float) -> tuple[Snapshot, list[str]]:
    """The app's figures and WARNING lines once the last stall of the load is in both.

    The watchdog delivers a stall once the loop is free again, so the last answer (and a
    scrape right after it) can come before that stall is logged and counted. Settled: no
    stall in progress, as many stalls in /metrics as finished-stall lines in the log, and
    neither changed over one more scrape; after ``timeout`` seconds, the figures as they are."""
    deadline = time.monotonic() + timeout
    seen: tuple[int, int] | None = None
    while True:
        snapshot = load_snapshot(url, timeout=30)
        warnings = _stall_warnings(log)
        counted = sum(int(n) for kinds in snapshot.expo.stalls.values() for n, _ in kinds.values())
        logged = sum("(still blocked)" not in line for line in warnings)  # long-stall lines
        now = (counted, logged)
        if snapshot.expo.current_stall == 0 and counted == logged and now == seen:
            return snapshot, warnings
        if time.monotonic() >= deadline:
            return snapshot, warnings
        seen = now
        time.sleep(0.2)


def _profile_lines(metrics_url: str, seconds: float | None) -> dict[tuple[str, str], str]:
    """(METHOD, route) -> its top line ("path:line in function": the innermost application
    frame of most samples) in the app's loop profile of the last ``seconds`` (default: the
    profile's own window); empty when the app serves no profile."""
    from loopwatch.cli.profile import summarise
    from loopwatch.profile import DEFAULT_SECONDS, KEEP_SECONDS, parse_collapsed

    window = DEFAULT_SECONDS if seconds is None else min(KEEP_SECONDS, math.ceil(seconds))
    try:
        text, _ = fetch(f"{metrics_url}/profile?seconds={window}", Deadline(10, "10s"))
    except CliError:
        return {}
    lines = {}
    for route in summarise(parse_collapsed(text)):
        method, _, path = route.label.partition(" ")
        top = route.lines[0][0] if route.lines else "-"
        if top != "-" and not top.startswith("(library)"):
            lines[method, path] = top
    return lines


def _cuts_window(
    before: Snapshot | None, after: Snapshot | None, paths: Sequence[str]
) -> LoopTime | None:
    """Loop time while the thousand-cuts pair ran (two scrapes around it), if it did."""
    if before is None or after is None:
        return None
    loop = loop_time(after, before)
    if loop is None or loop.wall is None:
        return None
    runs = " and ".join(paths)
    loop.window = f"while {runs} ran (the {loop.wall:.1f}s between two scrapes)"
    return loop


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
    side_port = _free_port(host)  # loopwatch's side port: the live page, live during freezes
    env = {**os.environ, "DEMO_WORK_SECONDS": repr(args.work_seconds)}
    env.update(LOOPWATCH_METRICS_PORT=str(side_port), LOOPWATCH_METRICS_HOST=host)
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
    if sys.version_info < (3, 12):
        # uvloop has no exact loop-time hook before 3.12 (sampled, it misses short steps):
        # asyncio's own loop keeps the demo's loop % exact
        command += ["--loop", "asyncio"]
    out.line(
        f"Starting the demo app: python {' '.join(command[1:])} (DEMO_WORK_SECONDS={args.work_seconds:g})"
    )
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_up(base + "/metrics", proc, log, timeout=30)
            out.line(f"Serving at {base}; loopwatch metrics at {base}/metrics")
            live_page = f"http://{host}:{side_port}/"
            out.line(f"Live page (updates even while the loop is frozen): {live_page}")
            out.line()
            results = []
            cuts = [p for p in args.endpoints if p in CUTS]
            before = after = None  # scrapes around the thousand-cuts pair's run
            for path in args.endpoints:
                ep = _BY_PATH[path]
                n, c, capped = plan(
                    args.requests, args.concurrency, args.work_seconds, args.budget, ep
                )
                if cuts and path == cuts[0]:
                    before = load_snapshot(base + "/metrics", timeout=30)
                with out.progress(f"{ep.method} {ep.path}", n) as advance:
                    wall, ok, latencies = asyncio.run(drive(host, port, ep, n, c, advance))
                if cuts and path == cuts[-1]:
                    after = load_snapshot(base + "/metrics", timeout=30)
                results.append(
                    LoadResult(ep, args.requests, n, ok, n - ok, c, wall, latencies, capped)
                )
            out.line()
            print_benchmark(out, results, args)
            out.line()
            snapshot, warnings = _settled_snapshot(base + "/metrics", log, timeout=5)
            loop = _cuts_window(before, after, cuts) or loop_time(snapshot)
            endpoints = route_table(root / "demo_app" / "main.py")
            # a culprit without a stall: the route's top line in the loop profile of the
            # window; its endpoint's definition when the profile has none
            seconds = loop.wall if loop is not None and loop.wall else None
            lines = _profile_lines(base + "/metrics", seconds)
            locations = {**endpoints, **lines}
            rows = diagnose(snapshot, loop=loop, locations=locations, endpoints=endpoints)
            print_diagnosis(out, snapshot, rows, loop)
            eaters = [r for r in rows if r.eats_loop]
            if any((r.method, r.route) in lines for r in eaters):
                out.line(
                    "A culprit without a stall is the route's top line in the loop profile "
                    f"(loopwatch profile {base}/metrics)."
                )
            if any(r.culprit.endswith("(endpoint)") for r in eaters):
                out.line(
                    "(endpoint): where the endpoint is defined, from the app's route table: "
                    "the loop profile named no line of the app inside it."
                )
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
                out.line(f"Live page: {live_page} (in the app: {base}/metrics/ui)")
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


def _endpoints(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    paths = [n if n.startswith("/") else "/" + n for n in names]
    unknown = [p for p in paths if p not in _BY_PATH]
    if unknown or not paths:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a comma-separated list of {', '.join(_BY_PATH)}"
        )
    return list(dict.fromkeys(paths))


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the article's benchmark against the demo app, with loopwatch's diagnosis",
        description="Start the demo app, load each endpoint like ApacheBench, print the "
        "measured table beside the article's figures, then loopwatch's diagnosis.",
    )
    demo.add_argument(
        "--requests",
        type=positive_int,
        default=300,
        help="requests per endpoint (default 300, as in the article)",
    )
    demo.add_argument(
        "--concurrency",
        type=positive_int,
        default=100,
        help="requests in flight at once (default 100)",
    )
    demo.add_argument(
        "--work-seconds",
        type=seconds(0, strict=True),
        default=0.5,
        help="seconds of blocking work per request (default 0.5)",
    )
    demo.add_argument(
        "--budget",
        type=seconds(0, strict=False),
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
        "--port", type=port_number, default=0, help="port on 127.0.0.1 (default: a free one)"
    )
    demo.add_argument("--serve", action="store_true", help="keep the app running afterwards")
    demo.add_argument("--plain", action="store_true", help="no colour, tables or progress bar")
    demo.set_defaults(run=run_demo)
