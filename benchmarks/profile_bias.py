"""The loop profile against ground truth: ``python -m benchmarks.profile_bias``
(also ``python -m benchmarks.run profile-bias``).

A uvicorn process (one worker) serves ``benchmarks.profile_bias:app``. Its route
``/work{N}`` burns N ms of pure-Python CPU in ``burn_a``, then N ms in ``burn_b``, then returns
a 32 KiB body (so the socket write, a point where the loop thread lets go of the GIL, follows
the work). The app measures its own loop thread's CPU time (``time.thread_time``) in each
function and, in an outermost ASGI wrapper, over each whole request (a request's task runs in
one step: a GET with no body never suspends), and serves the tallies at ``GET /truth``.

For each slice (1, 5, 12, 50 ms) and loop (asyncio, uvloop) the harness drives ``/work{N}``
with ``--connections`` keep-alive connections (``benchmarks.load``) for ``--seconds``, then
reads ``/metrics/profile`` and compares, within the route's samples, the share whose stack
holds ``burn_a`` with ``burn_a``'s share of the requests' CPU time. Prints a markdown table;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.serving import free_port, get, wait_up

ROOT = Path(__file__).resolve().parent.parent
SLICES = (1, 5, 12, 50)
BODY = b"x" * 32768


def build_app() -> Any:
    from fastapi import FastAPI, Response

    from loopwatch import LoopWatchMiddleware, metrics_app

    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    truth: dict[str, dict[str, float]] = {}

    def tally(route: str, name: str, seconds: float) -> None:
        into = truth.setdefault(route, {})
        into[name] = into.get(name, 0.0) + seconds

    def burn_a(route: str, ms: float) -> None:
        started = time.thread_time()
        while time.thread_time() - started < ms / 1000:
            pass
        tally(route, "a", time.thread_time() - started)

    def burn_b(route: str, ms: float) -> None:
        started = time.thread_time()
        while time.thread_time() - started < ms / 1000:
            pass
        tally(route, "b", time.thread_time() - started)

    def make(route: str, ms: float) -> Any:
        async def endpoint() -> Response:
            burn_a(route, ms)
            burn_b(route, ms)
            return Response(BODY, media_type="application/octet-stream")

        return endpoint

    for ms in SLICES:
        api.add_api_route(f"/work{ms}", make(f"/work{ms}", ms), methods=["GET"])

    @api.get("/truth")
    async def read_truth() -> dict[str, dict[str, float]]:
        return truth

    api.add_middleware(LoopWatchMiddleware)
    api.mount("/metrics", metrics_app())

    async def outermost(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/work"):
            await api(scope, receive, send)
            return
        started = time.thread_time()
        await api(scope, receive, send)
        tally(scope["path"], "request", time.thread_time() - started)
        tally(scope["path"], "requests", 1)

    return outermost


if os.environ.get("BENCH_PROFILE_BIAS_APP") == "1":
    app = build_app()


def shares(profile: str, route: str) -> dict[str, float]:
    """Within ``GET route``'s samples: the share whose stack holds burn_a, burn_b, and the
    share whose leaf is a socket write (ms of samples too)."""
    from loopwatch.profile import parse_collapsed

    total = a = b = write = 0
    for stack, count in parse_collapsed(profile):
        if stack[0] != f"GET {route}":
            continue
        total += count
        names = [frame.partition(" (")[0] for frame in stack[1:]]
        if any(n.endswith("burn_a") for n in names):
            a += count
        elif any(n.endswith("burn_b") for n in names):
            b += count
        elif "write" in names[-1].lower() or "send" in names[-1].lower():
            write += count
    if not total:
        return {"sampled": 0.0, "a": 0.0, "b": 0.0, "write": 0.0}
    return {"sampled": float(total), "a": a / total, "b": b / total, "write": write / total}


def measure(loop: str, slices: Sequence[int], seconds: float, connections: int,
            server_cpu: str, load_cpu: str) -> list[dict[str, Any]]:  # fmt: skip
    from benchmarks.load import run

    port = free_port()
    pin = ["taskset", "-c", server_cpu] if server_cpu else []
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    proc = subprocess.Popen(
        [*pin, sys.executable, "-m", "uvicorn", "benchmarks.profile_bias:app", "--port",
         str(port), "--loop", loop, "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env={**env, "BENCH_PROFILE_BIAS_APP": "1"}, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_up(url + "/truth", proc, log)
        if load_cpu:
            os.sched_setaffinity(0, {int(c) for c in load_cpu.split(",")})
        for ms in slices:
            route = f"/work{ms}"
            started = time.monotonic()
            done = asyncio.run(run("127.0.0.1", port, route, 0, connections, seconds, 0))
            window = int(time.monotonic() - started) + 2
            time.sleep(0.3)  # the last checks
            truth = json.loads(get(url + "/truth"))[route]
            profile = get(url + f"/metrics/profile?seconds={window}").decode()
            measured = shares(profile, route)
            rows.append({"loop": loop, "ms": ms, "requests": done["requests"],
                         "true_a": truth["a"] / truth["request"],
                         "true_b": truth["b"] / truth["request"], **measured})  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    return rows


def report(rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"`{command}`: Python {platform.python_version()}, one uvicorn worker; per request, "
        "N ms in burn_a, N ms in burn_b, a 32 KiB response. Shares are of the route's "
        "samples (measured) and of its requests' loop-thread CPU time (true).",
        "",
        "| loop | slice | requests | sampled ms | burn_a measured | burn_a true | "
        "difference (points) | burn_b measured | burn_b true | at the socket write |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loop']} | {r['ms']} ms | {r['requests']} | {r['sampled']:.0f} | "
            f"{100 * r['a']:.1f}% | {100 * r['true_a']:.1f}% | "
            f"{100 * (r['a'] - r['true_a']):+.1f} | {100 * r['b']:.1f}% | "
            f"{100 * r['true_b']:.1f}% | {100 * r['write']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_bias", description=__doc__)
    parser.add_argument("--loop", default="asyncio,uvloop")
    parser.add_argument("--slices", default=",".join(map(str, SLICES)), help="ms, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="per slice and loop")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    args = parser.parse_args(argv)
    slices = [int(s) for s in args.slices.split(",") if s]
    rows = []
    for loop in args.loop.split(","):
        rows += measure(loop, slices, args.seconds, args.connections, args.server_cpu,
                        args.load_cpu)  # fmt: skip
    command = "python -m benchmarks.profile_bias " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(report(rows, command.strip()))


if __name__ == "__main__":
    main()
