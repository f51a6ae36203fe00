"""loopwatch's benchmarks: ``python -m benchmarks.run [all|overhead|idle|detect|memory]``.

Prints markdown tables (the figures in BENCHMARKS.md come from here); it is not a test and
asserts nothing. Every server is a real uvicorn process (one worker) serving
``benchmarks.apps`` on 127.0.0.1, pinned to one core (``--server-cpu``); the load generator
(``wrk`` when installed, else ``benchmarks.load``) is pinned to the other (``--load-cpu``).

- overhead: requests per second of a trivial endpoint for each variant (bare, a no-op ASGI
  middleware, loopwatch stalls only, loopwatch with request metrics but no loop time, loopwatch
  with its defaults (request metrics and loop time), prometheus-fastapi-instrumentator,
  starlette-exporter, OpenTelemetry, the stall detectors asynclens and aiocop), with 1 route
  and with 200 routes (the last one hit).
  The servers of one route count run side by side; rounds visit every variant in turn (the
  order rotates each round) and the table shows medians and each variant's ratio to bare.
- idle: CPU seconds per minute of an idle app with and without loopwatch (utime + stime
  from /proc/PID/stat).
- detect: blockers of 0.05-2 s in an ``async def`` (sleeping and CPU-bound); the harness
  polls loopwatch's side port every 5 ms and reports when the stall became visible
  (``loopwatch_current_stall_seconds`` > 0), when it was recorded (``_count`` grew) and the
  error of the recorded duration (``_sum`` delta) against what the endpoint measured itself.
- memory: RSS (/proc/PID/status VmRSS) before and after 100,000 requests spread over 200
  routes.
- profile-bias: the loop profile's shares against the app's own CPU time per function
  (``benchmarks.profile_bias``; ``profile-bias --help`` for its options). Not part of ``all``.
- gil-holds: calls that keep the GIL (math.factorial, json.loads, pydantic-core) under
  uvicorn (asyncio, uvloop) and the pytest plugin (asyncio.run, TestClient): detected, route,
  culprit line and kind against the app's own timing (``benchmarks.gil_holds``;
  ``gil-holds --help`` for its options). Not part of ``all``.

A full run (``make bench``) takes about seven minutes on two cores. ``--quick`` checks the
harness in about a minute; its figures are too short to quote.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.apps import PARTS, VARIANTS

ROOT = Path(__file__).resolve().parent.parent
ROTATE_LUA = Path(__file__).resolve().parent / "rotate.lua"

# variant -> the module it needs beyond the demo extra (None: always available)
_NEEDS = {
    "instrumentator": "prometheus_fastapi_instrumentator",
    "starlette-exporter": "starlette_exporter",
    "otel": "opentelemetry.instrumentation.fastapi",
    "asynclens": "asynclens",
    "aiocop": "aiocop",
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Options:
    loop: str
    http: str
    server_cpu: str
    load_cpu: str
    load: str  # "wrk" or "python"
    connections: int
    duration: float
    warmup: float
    rounds: int
    variants: list[str]
    routes: list[int]
    idle_seconds: float
    blockers: list[float]
    repeats: int
    requests: int
    memory_variants: list[str]
    notes: list[str] = field(default_factory=list)
    # "variant@REF" -> the directory holding loopwatch as of git REF (``--baseline``)
    baseline: dict[str, str] = field(default_factory=dict)


# -- processes -------------------------------------------------------------------------


def _pin(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if cpu and shutil.which("taskset") else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``uvicorn benchmarks.apps:app`` in a subprocess, pinned to ``opts.server_cpu``."""

    def __init__(self, opts: Options, variant: str, routes: int, **env: str) -> None:
        self.variant = variant
        self.routes = routes
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        # loopwatch's defaults with no code change: the runner execs uvicorn (same pid); it
        # sets a multiprocess directory of its own, so the figures are mirrored to files too
        runner = ["-m", "loopwatch", "run", "--metrics-port", "none", "--", sys.executable]
        command = [
            *_pin(opts.server_cpu), sys.executable,
            *(runner if variant.partition("@")[0] == "loopwatch-run" else []),
            "-m", "uvicorn", "benchmarks.apps:app",
            "--host", "127.0.0.1", "--port", str(self.port), "--loop", opts.loop,
            "--http", opts.http, "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH_", "BENCH_"))}
        older = opts.baseline.get(variant)
        if older is not None:  # loopwatch as of --baseline REF, ahead of the installed one
            clean["PYTHONPATH"] = os.pathsep.join([older, str(ROOT)])
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={
                **clean,
                "BENCH_VARIANT": variant.partition("@")[0],
                "BENCH_ROUTES": str(routes),
                **env,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.variant} server exited:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/r0/up", timeout=2) as answer:
                    answer.read()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"{self.variant} server did not answer within {timeout}s")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def servers(
    opts: Options, variants: Sequence[str], routes: int, **env: str
) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for variant in variants:
            started[variant] = Server(opts, variant, routes, **env)
        for server in started.values():
            server.wait_up()
        yield started
    finally:
        for server in started.values():
            server.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- load ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    bad: int  # non-2xx answers and socket errors


_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b")
_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def load(
    opts: Options, server: Server, duration: float, *, path: str = "", rotate: int = 0,
    requests: int = 0,
) -> LoadResult:  # fmt: skip
    """Drive ``server`` for ``duration`` seconds (or ``requests`` requests, whichever first)."""
    if opts.load == "wrk":
        command = [*_pin(opts.load_cpu), "wrk", "-t1", f"-c{opts.connections}",
                   f"-d{max(1, math.ceil(duration))}s"]  # fmt: skip
        if rotate:
            command += ["-s", str(ROTATE_LUA), server.url, "--", str(rotate), str(requests)]
        else:
            command.append(server.url + path)
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        total = _WRK_TOTAL.search(out)
        rps = _WRK_RPS.search(out)
        if total is None or rps is None:
            raise RuntimeError(f"cannot read wrk's summary:\n{out}")
        bad = sum(int(n) for m in (_WRK_NON2XX.search(out),) if m for n in m.groups())
        errors = _WRK_ERRORS.search(out)
        bad += sum(int(n) for n in errors.groups()) if errors else 0
        return LoadResult(int(total.group(1)), float(total.group(2)) * _UNIT[total.group(3)],
                          float(rps.group(1)), bad)  # fmt: skip
    command = [*_pin(opts.load_cpu), sys.executable, "-m", "benchmarks.load",
               "--port", str(server.port), "--connections", str(opts.connections),
               "--duration", str(duration), "--requests", str(requests)]  # fmt: skip
    command += ["--rotate", str(rotate)] if rotate else ["--path", path]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    data = json.loads(out.strip().splitlines()[-1])
    return LoadResult(int(data["requests"]), float(data["seconds"]), float(data["rps"]),
                      int(data["non_2xx"]) + int(data["errors"]))  # fmt: skip


# -- the parts -------------------------------------------------------------------------


def overhead(opts: Options) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for routes in opts.routes:
        path = f"/r{routes - 1}/42"  # the last route registered: a router walks past all others
        rps: dict[str, list[float]] = {v: [] for v in opts.variants}
        # server CPU microseconds per request: unlike req/s, barely moved by other
        # processes taking turns on the server's core (a shared machine)
        cpu_us: dict[str, list[float]] = {v: [] for v in opts.variants}
        bad = 0
        with servers(opts, opts.variants, routes) as running:
            for server in running.values():
                load(opts, server, opts.warmup, path=path)
            for round_no in range(opts.rounds):
                shift = round_no % len(opts.variants)
                order = opts.variants[shift:] + opts.variants[:shift]
                for variant in order:
                    server = running[variant]
                    cpu0 = cpu_seconds(server.pid)
                    result = load(opts, server, opts.duration, path=path)
                    cpu1 = cpu_seconds(server.pid)
                    rps[variant].append(result.rps)
                    cpu_us[variant].append((cpu1 - cpu0) / max(1, result.requests) * 1e6)
                    bad += result.bad
                _progress(f"overhead routes={routes} round {round_no + 1}/{opts.rounds}: " +
                          ", ".join(f"{v} {rps[v][-1]:.0f}/s {cpu_us[v][-1]:.0f}us"
                                    for v in opts.variants))  # fmt: skip
        results[str(routes)] = {"path": path, "rps": rps, "cpu_us": cpu_us, "bad_responses": bad}
    return results


def idle(opts: Options) -> dict[str, Any]:
    variants = ["bare", "loopwatch", *(v for v in opts.baseline if v.startswith("loopwatch@"))]
    # the servers idle side by side; each round is one window of idle_seconds, and a
    # variant's cost is read against bare's in the same window (the machine's noise is shared)
    percent: dict[str, list[float]] = {v: [] for v in variants}
    with servers(opts, variants, 1) as running:
        time.sleep(2.0)  # let start-up work finish
        for round_no in range(opts.rounds):
            _progress(f"idle round {round_no + 1}/{opts.rounds}")
            before = {v: cpu_seconds(s.pid) for v, s in running.items()}
            started = time.monotonic()
            time.sleep(opts.idle_seconds)
            elapsed = time.monotonic() - started
            for v, s in running.items():
                percent[v].append((cpu_seconds(s.pid) - before[v]) / elapsed * 100)
    return {v: {"percent": percent[v]} for v in variants}


def _scrape(url: str) -> tuple[float, dict[str, float], dict[str, float]]:
    """(current stall seconds, _count by kind, _sum by kind) for route /block."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    current = 0.0
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("loopwatch_current_stall_seconds "):
            current = float(line.split()[-1])
        elif line.startswith("loopwatch_stall_duration_seconds_") and 'route="/block"' in line:
            kind = re.search(r'kind="(\w+)"', line)
            key = kind.group(1) if kind else "?"
            if line.startswith("loopwatch_stall_duration_seconds_count"):
                counts[key] = float(line.split()[-1])
            elif line.startswith("loopwatch_stall_duration_seconds_sum"):
                sums[key] = float(line.split()[-1])
    return current, counts, sums


def detect(opts: Options) -> dict[str, Any]:
    metrics_port = _free_port()
    threshold = 0.1  # loopwatch's default; the server runs with default settings
    query = "&".join(
        f"name[]={n}"
        for n in (
            "loopwatch_current_stall_seconds",
            "loopwatch_stall_duration_seconds_count",
            "loopwatch_stall_duration_seconds_sum",
        )
    )
    side = f"http://127.0.0.1:{metrics_port}/metrics?{query}"
    rows: list[dict[str, Any]] = []
    with servers(
        opts, ["loopwatch"], 1, BENCH_METRICS_PORT=str(metrics_port), BENCH_BLOCK="1"
    ) as running:
        url = running["loopwatch"].url
        for kind in ("wait", "cpu"):
            for seconds in opts.blockers:
                for _ in range(opts.repeats):
                    rows.append(_detect_one(url, side, kind, seconds, threshold))
                    time.sleep(0.2)
    return {"threshold": threshold, "poll_interval": 0.005, "rows": rows}


def _detect_one(url: str, side: str, kind: str, seconds: float, threshold: float) -> dict[str, Any]:
    _, counts0, sums0 = _scrape(side)
    answer: dict[str, Any] = {}

    def call() -> None:
        cpu = "&cpu=1" if kind == "cpu" else ""
        with urllib.request.urlopen(f"{url}/block?seconds={seconds}{cpu}", timeout=30) as r:
            answer.update(json.loads(r.read()))

    caller = threading.Thread(target=call)
    caller.start()
    visible_at: float | None = None
    recorded_at: float | None = None
    counts, sums = counts0, sums0
    deadline = time.monotonic() + seconds + 3.0
    while time.monotonic() < deadline:
        current, counts, sums = _scrape(side)
        now = time.monotonic()
        if current > 0 and visible_at is None:
            visible_at = now
        if sum(counts.values()) > sum(counts0.values()):
            recorded_at = now
            break
        if not caller.is_alive() and now > answer.get("end", now) + 1.0:
            break  # finished a second ago and never recorded: below the threshold
        time.sleep(0.005)
    caller.join()
    start, end = answer["start"], answer["end"]
    true = end - start
    recorded = sum(sums.values()) - sum(sums0.values())
    row: dict[str, Any] = {"kind": kind, "blocker": seconds, "true": true,
                           "stalls": round(sum(counts.values()) - sum(counts0.values())),
                           "kinds": sorted(k for k in counts if counts[k] != counts0.get(k, 0))}  # fmt: skip
    row["visible_after"] = None if visible_at is None else visible_at - start
    row["recorded_after_end"] = None if recorded_at is None else recorded_at - end
    row["error"] = recorded - true if recorded_at is not None else None
    return row


def memory(opts: Options) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for variant in opts.memory_variants:
        with servers(opts, [variant], 200) as running:
            server = running[variant]
            time.sleep(1.0)
            before = rss_mib(server.pid)
            done = 0
            bad = 0
            rate = 0.0
            checkpoints: list[tuple[int, float]] = []  # (requests so far, RSS MiB)
            # wrk runs for its whole -d even after the script stops its thread at the
            # budget, so run chunks sized from the last chunk's rate; RSS after each quarter
            # tells growth that levels off (allocator, caches) from a leak.
            for quarter in range(1, 5):
                target = opts.requests * quarter // 4
                while done < target:
                    left = target - done
                    chunk = min(10.0, max(1.0, left / rate * 1.02)) if rate else 2.0
                    result = load(opts, server, chunk, rotate=200, requests=left)
                    if result.requests == 0:
                        raise RuntimeError(f"{variant}: no request answered:\n{server.output()}")
                    done += result.requests
                    bad += result.bad
                    rate = result.rps or rate
                time.sleep(0.5)
                checkpoints.append((done, rss_mib(server.pid)))
            after = checkpoints[-1][1]
        results[variant] = {"requests": done, "rss_before_mib": before, "rss_after_mib": after,
                            "checkpoints": checkpoints, "bad_responses": bad}  # fmt: skip
        _progress(f"memory {variant}: {before:.1f} -> {after:.1f} MiB after {done} requests")
    return results


# -- report ----------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = ""
    if shutil.which("wrk"):
        wrk_out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        wrk = (wrk_out.stdout or wrk_out.stderr).splitlines()[0].split(" Copyright")[0]
    dists = ["loopwatch", "fastapi", "starlette", "uvicorn", "uvloop", "httptools",
             "prometheus-client", "prometheus-fastapi-instrumentator", "starlette-exporter",
             "opentelemetry-instrumentation-fastapi", "asynclens", "aiocop"]  # fmt: skip
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "wrk": wrk or "not installed",
        "versions": {d: _version(d) for d in dists},
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(opts: Options, results: dict[str, Any], command: str) -> str:
    info = results["machine"]
    lines = [
        "## Run",
        "",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, "
        f"Python {info['python']}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in info['load_average'])}; "
        f"at end: {' '.join(f'{x:.2f}' for x in results['load_average_end'])}",
        f"- server: uvicorn, 1 worker, --loop {opts.loop} --http {opts.http}, "
        f"pinned to CPU {opts.server_cpu or '-'}; load: "
        + (
            f"{info['wrk']}, -t1 -c{opts.connections}"
            if opts.load == "wrk"
            else f"benchmarks/load.py, {opts.connections} connections"
        )
        + f", pinned to CPU {opts.load_cpu or '-'}",
        "- versions: " + ", ".join(f"{d} {v}" for d, v in info["versions"].items()),
    ]
    lines += [f"- note: {n}" for n in opts.notes]

    if "overhead" in results:
        lines += ["", "## Per-request overhead", "",
                  f"{opts.rounds} interleaved rounds of {opts.duration:g} s per variant; "
                  "median requests/s, its ratio to bare's median, and the range of the "
                  "per-round ratios (each variant against bare in the same round); then the "
                  "server process's CPU time per request (utime + stime over the requests "
                  "served) and bare's CPU per request divided by the variant's: the "
                  "throughput ratio a dedicated core would show."]  # fmt: skip
        for routes, data in results["overhead"].items():
            rps, cpu = data["rps"], data["cpu_us"]
            bare = statistics.median(rps["bare"]) if rps.get("bare") else None
            bare_cpu = statistics.median(cpu["bare"]) if cpu.get("bare") else None
            lines += ["", f"### {routes} route(s), GET {data['path']}", "",
                      "| variant | median req/s | ratio to bare | per-round ratios | "
                      "server CPU µs/request | CPU ratio (bare/variant) |",
                      "|---|---:|---:|---|---:|---:|"]  # fmt: skip
            for variant, values in rps.items():
                med = statistics.median(values)
                ratio = med / bare if bare else None
                per_round = (
                    [v / b for v, b in zip(values, rps["bare"], strict=True)] if bare else []
                )
                span = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-"
                med_cpu = statistics.median(cpu[variant])
                cpu_ratio = bare_cpu / med_cpu if bare_cpu and med_cpu else None
                lines.append(f"| {variant} | {med:.0f} | {_fmt(ratio, 2)} | {span} | "
                             f"{med_cpu:.0f} | {_fmt(cpu_ratio, 2)} |")  # fmt: skip
            if data["bad_responses"]:
                lines.append(f"\n{data['bad_responses']} non-2xx answers or socket errors.")

    if "idle" in results:
        lines += ["", "## Idle cost", "",
                  f"An idle app (1 route, no traffic), {opts.rounds} windows of "
                  f"{opts.idle_seconds:g} s with every variant idle side by side; CPU time of "
                  "the whole process from /proc/PID/stat. *added*: over bare in the same "
                  "window.", "",
                  "| variant | % of one core, median | range | added, median | added, range |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        bare_idle = results["idle"]["bare"]["percent"]
        for variant, data in results["idle"].items():
            values = data["percent"]
            added = [v - b for v, b in zip(values, bare_idle, strict=True)]
            lines.append(f"| {variant} | {statistics.median(values):.2f}% | "
                         f"{min(values):.2f}-{max(values):.2f}% | "
                         f"{statistics.median(added):+.2f} | "
                         f"{min(added):+.2f} to {max(added):+.2f} |")  # fmt: skip

    if "detect" in results:
        data = results["detect"]
        lines += ["", "## Detection", "",
                  f"loopwatch with default settings (threshold {data['threshold']:g} s, "
                  "heartbeat 0.01 s); the side port polled every 5 ms. *visible*: from the "
                  "blocker's start until `loopwatch_current_stall_seconds` > 0; *recorded*: "
                  "from its end until `loopwatch_stall_duration_seconds_count` grew; *error*: "
                  "the `_sum` delta minus the duration the endpoint measured itself. "
                  "Medians (max) over the repeats.", "",
                  "| blocker | kind | stalls | visible after s | recorded after end s | "
                  "error ms | recorded kind |",
                  "|---:|---|---:|---:|---:|---:|---|"]  # fmt: skip
        groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
        for row in data["rows"]:
            groups.setdefault((row["kind"], row["blocker"]), []).append(row)
        for (kind, blocker), rows in groups.items():
            lines.append(
                f"| {blocker:g} | {kind} | {'/'.join(str(r['stalls']) for r in rows)} | "
                f"{_med_max([r['visible_after'] for r in rows])} | "
                f"{_med_max([r['recorded_after_end'] for r in rows])} | "
                f"{_med_max([r['error'] for r in rows], scale=1000, digits=1)} | "
                f"{','.join(sorted({k for r in rows for k in r['kinds']})) or '-'} |"
            )

    if "memory" in results:
        lines += ["", "## Memory", "",
                  "RSS of an app with 200 routes before and after requests spread over all "
                  "of them (`/r{k}/{n}`, a new item id each request).", "",
                  "| variant | requests | RSS before MiB | RSS after each quarter MiB | "
                  "growth MiB |", "|---|---:|---:|---|---:|"]  # fmt: skip
        for variant, mem in results["memory"].items():
            quarters = " / ".join(f"{rss:.1f}" for _, rss in mem["checkpoints"])
            lines.append(
                f"| {variant} | {mem['requests']} | {mem['rss_before_mib']:.1f} | {quarters} | "
                f"{mem['rss_after_mib'] - mem['rss_before_mib']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _med_max(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str:
    known = [v * scale for v in values if v is not None]
    if not known:
        return "-"
    missing = len(values) - len(known)
    digits_note = f" ({missing} none)" if missing else ""
    worst = max(known, key=abs)
    return f"{statistics.median(known):.{digits}f} ({worst:.{digits}f}){digits_note}"


# -- command line ----------------------------------------------------------------------


def _csv(kind: type, text: str) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_options(argv: Sequence[str] | None) -> tuple[list[str], Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("parts", nargs="*", default="all",
                        choices=["all", "overhead", "idle", "detect", "memory",
                                 "profile-bias", "gil-holds"])  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="tiny run to check the harness (overrides the sizes)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per server, once")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--routes", default="1,200", help="route counts, comma-separated")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--blockers", default="0.05,0.1,0.25,0.5,1,2", help="seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--memory-variants", default="bare,loopwatch")
    parser.add_argument("--loop", default="", help="uvicorn --loop (default: uvloop if installed)")
    parser.add_argument(
        "--http", default="", help="uvicorn --http (default: httptools if installed)"
    )
    parser.add_argument("--load", choices=["wrk", "python"], default="",
                        help="load generator (default: wrk if installed)")  # fmt: skip
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--baseline", metavar="REF",
                        help="also run each loopwatch variant as of git REF, side by side")  # fmt: skip
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)

    notes: list[str] = []
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.5
        args.idle_seconds, args.blockers, args.repeats = 5.0, "0.05,0.5", 1
        args.requests = 5000
        notes.append("--quick: figures too short to quote")
    for name in ("rounds", "repeats", "requests", "connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)!r}: expected a whole number >= 1")
    for name in ("duration", "idle_seconds"):
        if getattr(args, name) <= 0:
            parser.error(
                f"--{name.replace('_', '-')}={getattr(args, name)!r}: expected seconds > 0"
            )
    try:
        routes = _csv(int, args.routes)
        blockers = _csv(float, args.blockers)
    except ValueError as exc:
        parser.error(f"--routes/--blockers: expected comma-separated numbers ({exc})")
    if not routes or min(routes) < 1:
        parser.error(f"--routes={args.routes!r}: expected route counts of at least 1")

    def available(names: list[str], option: str) -> list[str]:
        out = []
        for name in names:
            if name not in VARIANTS + PARTS:
                parser.error(f"{option}={name!r}: expected some of {', '.join(VARIANTS + PARTS)}")
            module = _NEEDS.get(name)
            if module and importlib.util.find_spec(module.split(".")[0]) is None:
                notes.append(f"{name} skipped: {module} is not installed (pip install '.[bench]')")
                continue
            if module and "." in module and importlib.util.find_spec(module) is None:
                notes.append(f"{name} skipped: {module} is not installed")
                continue
            out.append(name)
        return out

    variants = available(_csv(str, args.variants), "--variants")
    if "bare" not in variants:
        variants.insert(0, "bare")  # every ratio is against bare measured in the same run
    memory_variants = available(_csv(str, args.memory_variants), "--memory-variants")

    loop = args.loop or ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    http = args.http or ("httptools" if importlib.util.find_spec("httptools") else "h11")
    if not args.http and http == "h11":
        notes.append("httptools is not installed: uvicorn parses HTTP with h11 (slower)")
    load_kind = args.load or ("wrk" if shutil.which("wrk") else "python")
    if load_kind == "python":
        why = (
            "--load python" if shutil.which("wrk") else "wrk is not installed (apt-get install wrk)"
        )
        notes.append(
            f"{why}: load from benchmarks/load.py, one Python process that may saturate "
            "before the server does, which shrinks the req/s ratios (not the CPU ratios)"
        )
    if not shutil.which("taskset"):
        notes.append("taskset is not installed: server and load generator are not pinned")

    parts = ["overhead", "idle", "detect", "memory"] if "all" in args.parts else args.parts
    baseline: dict[str, str] = {}
    if args.baseline:
        from benchmarks.plugin_cost import export_loopwatch

        tree = Path(tempfile.mkdtemp(prefix="loopwatch-baseline-"))
        export_loopwatch(args.baseline, tree)
        for variant in [v for v in variants if "loopwatch" in v]:
            label = f"{variant}@{args.baseline}"
            baseline[label] = str(tree)
            variants.append(label)
    opts = Options(
        loop=loop, http=http, server_cpu=args.server_cpu, load_cpu=args.load_cpu,
        load=load_kind, connections=args.connections, duration=args.duration,
        warmup=args.warmup, rounds=args.rounds, variants=variants, routes=routes,
        idle_seconds=args.idle_seconds, blockers=blockers, repeats=args.repeats,
        requests=args.requests, memory_variants=memory_variants, notes=notes,
        baseline=baseline,
    )  # fmt: skip
    return parts, opts, args


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["profile-bias"]:  # its own harness and options (--help lists them)
        from benchmarks.profile_bias import main as profile_bias

        profile_bias(argv[1:])
        return
    if argv[:1] == ["gil-holds"]:  # its own harness and options (--help lists them)
        from benchmarks.gil_holds import main as gil_holds

        gil_holds(argv[1:])
        return
    parts, opts, args = parse_options(argv)
    # a SIGTERM (make's, timeout's) unwinds like Ctrl-C, so the servers are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"machine": machine()}
    started = time.monotonic()
    runners = {"overhead": overhead, "idle": idle, "detect": detect, "memory": memory}
    for part in dict.fromkeys(parts):
        _progress(f"{part} ...")
        results[part] = runners[part](opts)
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.monotonic() - started
    text = report(opts, results, command.strip())
    text += f"\nTotal run time: {results['seconds']:.0f} s.\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
