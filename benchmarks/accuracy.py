"""Loop time against ground truth: ``python -m benchmarks.accuracy [--loop asyncio,uvloop]``.

A uvicorn process (one worker, pinned to one core) serves ``benchmarks.accuracy:app``, whose
routes burn the CPU on the loop thread for a known time and add what they burned to their own
tally (``GET /truth``):

- ``/burn1``, ``/burn3``: two slices of 1 ms (3 ms) per request, split by an ``await``;
- ``/burn12``: one 12 ms slice per request;
- ``/callback3``: two 3 ms slices per request in plain callbacks (``call_soon``,
  ``call_later``) the endpoint schedules and awaits, not in task steps;
- ``/await``: only awaits (``asyncio.sleep``), the framework's own cost per request.

The harness drives every route at once at a fixed rate (open loop, from the other core) for
``--seconds``, then compares ``loopwatch_event_loop_busy_seconds_total`` per route with the
tally: the ratio, and the ratio once the framework's cost per request (the ``/await`` route's
loop time per request) is taken off. Utilization is compared with the loop thread's own CPU
time over the window (/proc/PID/task/PID/stat): every route computes, none sleeps, so the two
should agree. Prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.serving import free_port, get, wait_up

ROOT = Path(__file__).resolve().parent.parent
# route -> (slices per request, ms per slice, requests per second)
ROUTES: dict[str, tuple[int, float, float]] = {
    "/burn1": (2, 1.0, 100.0),
    "/burn3": (2, 3.0, 30.0),
    "/burn12": (1, 12.0, 15.0),
    "/callback3": (2, 3.0, 30.0),
    "/await": (0, 0.0, 100.0),
}
IN_CALLBACKS = {"/callback3"}  # its slices run in plain callbacks, not in the endpoint
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_app() -> Any:
    from fastapi import FastAPI

    from loopwatch import LoopWatchMiddleware, metrics_app

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    truth: dict[str, float] = {}

    def burn(route: str, ms: float) -> None:
        started = time.perf_counter()
        while time.perf_counter() - started < ms / 1000:
            pass
        truth[route] = truth.get(route, 0.0) + time.perf_counter() - started

    def make(route: str, slices: int, ms: float) -> Any:
        async def endpoint() -> dict[str, str]:
            for i in range(slices):
                if i:
                    await asyncio.sleep(0)
                burn(route, ms)
            if not slices:
                await asyncio.sleep(0.005)
            return {}

        endpoint.__name__ = "endpoint" + route.replace("/", "_")
        return endpoint

    def make_callbacks(route: str, slices: int, ms: float) -> Any:
        async def endpoint() -> dict[str, str]:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            left = [slices]

            def callback() -> None:
                burn(route, ms)
                left[0] -= 1
                if not left[0]:
                    done.set_result(None)

            loop.call_soon(callback)
            for i in range(1, slices):
                loop.call_later(0.001 * i, callback)
            await done
            return {}

        endpoint.__name__ = "endpoint" + route.replace("/", "_")
        return endpoint

    for route, (slices, ms, _) in ROUTES.items():
        maker = make_callbacks if route in IN_CALLBACKS else make
        app.add_api_route(route, maker(route, slices, ms), methods=["GET"])

    @app.get("/truth")
    async def tally() -> dict[str, float]:
        return dict(truth)

    app.add_middleware(LoopWatchMiddleware, threshold=0.5)
    app.mount("/metrics", metrics_app())
    return app


if os.environ.get("BENCH_ACCURACY_APP") == "1":
    app = build_app()


def _busy(url: str) -> dict[str, float]:
    text = get(url + "/metrics").decode()
    out: dict[str, float] = {}
    pattern = re.compile(
        r'^loopwatch_event_loop_busy_seconds_total\{method="([^"]*)",route="([^"]*)"\} (\S+)$'
    )
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            out[f"{match[1]} {match[2]}"] = float(match[3])
    return out


def _loop_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


async def _drive(port: int, seconds: float) -> dict[str, int]:
    sent = dict.fromkeys(ROUTES, 0)

    async def one(route: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {route} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await reader.read()
        writer.close()
        sent[route] += 1

    async def route_load(route: str, rate: float) -> None:
        tasks = set()
        started = time.monotonic()
        n = 0
        while (elapsed := time.monotonic() - started) < seconds:
            due = n / rate - elapsed
            if due > 0:
                await asyncio.sleep(due)
            task = asyncio.create_task(one(route))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        await asyncio.gather(*tasks, return_exceptions=True)

    await asyncio.gather(*(route_load(r, rate) for r, (_, _, rate) in ROUTES.items()))
    return sent


def measure(loop: str, seconds: float, server_cpu: str, load_cpu: str) -> dict[str, Any]:
    port = free_port()
    pin = ["taskset", "-c", server_cpu] if server_cpu else []
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
    proc = subprocess.Popen(
        [*pin, sys.executable, "-m", "uvicorn", "benchmarks.accuracy:app", "--port", str(port),
         "--loop", loop, "--no-access-log", "--log-level", "warning"],
        cwd=ROOT, env={**env, "BENCH_ACCURACY_APP": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url + "/truth", proc, log)
        if load_cpu:
            os.sched_setaffinity(0, {int(c) for c in load_cpu.split(",")})
        busy0, truth0, cpu0, t0 = _busy(url), json.loads(get(url + "/truth")), _loop_cpu(proc.pid), time.monotonic()  # fmt: skip
        sent = asyncio.run(_drive(port, seconds))
        time.sleep(0.5)  # the last requests end; the watchdog books within 0.25 s
        busy1, truth1, cpu1, t1 = _busy(url), json.loads(get(url + "/truth")), _loop_cpu(proc.pid), time.monotonic()  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    busy = {k: busy1.get(k, 0.0) - busy0.get(k, 0.0) for k in busy1}
    truth = {k: truth1.get(k, 0.0) - truth0.get(k, 0.0) for k in truth1}
    return {"loop": loop, "busy": busy, "truth": truth, "sent": sent,
            "loop_cpu": cpu1 - cpu0, "wall": t1 - t0}  # fmt: skip


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        f"Python {platform.python_version()}, one uvicorn worker; every route driven at once "
        "(open loop) for the window.",
        "",
        "| loop | route | work per request | req | truth s | loop time s | ratio | "
        "ratio, framework cost taken off |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        sent = r["sent"]
        awaited = r["busy"].get("GET /await", 0.0)
        per_request = awaited / sent["/await"] if sent["/await"] else 0.0
        for route, (slices, ms, _) in ROUTES.items():
            busy = r["busy"].get(f"GET {route}", 0.0)
            known = r["truth"].get(route, 0.0)
            work = f"{slices} x {ms:g} ms" if slices else "awaits only"
            if route in IN_CALLBACKS:
                work += " in callbacks"
            if known:
                net = busy - per_request * sent[route]
                ratio, net_ratio = f"{busy / known:.2f}", f"{net / known:.2f}"
            else:
                ratio = net_ratio = (
                    f"{busy / sent[route] * 1000:.3f} ms/req" if sent[route] else "-"
                )
            lines.append(
                f"| {r['loop']} | {route} | {work} | {sent[route]} | {known:.3f} | {busy:.3f} | "
                f"{ratio} | {net_ratio} |"
            )
    lines += ["", "| loop | utilization (loop time / wall) | loop thread CPU / wall | ratio | "
              "<server> s | <background> s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        total = sum(r["busy"].values())
        util, cpu = total / r["wall"], r["loop_cpu"] / r["wall"]
        lines.append(
            f"| {r['loop']} | {util:.3f} | {cpu:.3f} | {util / cpu:.2f} | "
            f"{r['busy'].get('- <server>', 0.0):.3f} | {r['busy'].get('- <background>', 0.0):.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__)
    parser.add_argument("--loop", default="asyncio,uvloop")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--load-cpu", default="1")
    args = parser.parse_args(argv)
    results = [
        measure(loop, args.seconds, args.server_cpu, args.load_cpu) for loop in args.loop.split(",")
    ]
    print(report(results))


if __name__ == "__main__":
    main()
