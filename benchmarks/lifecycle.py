"""A request's end and the app's end: what loopwatch records at each.

``python -m benchmarks.lifecycle [--runs 5] [--requests 3] [--baseline REF]`` prints two tables.

(a) A Starlette endpoint that answers at once and queues a ``BackgroundTask`` awaiting 1 s,
under a real uvicorn (in a thread of the measuring process, which reads the registry
directly): the client's time to the full response, the value
``loopwatch_request_duration_seconds`` recorded for it, and how long
``loopwatch_requests_in_flight`` stayed above 0 (sampled every 5 ms). Median of ``--requests``.

(b) A stall at the app's end, in how many of ``--runs`` fresh processes it is reported through
each of ``on_stall``, the WARNING log line and ``loopwatch_stall_duration_seconds_count``:
a lifespan shutdown handler that blocks the loop 0.4 s, under uvicorn; and
``with TestClient(app) as client: client.get("/block")`` (the endpoint blocks 0.4 s) then exit.
Each on asyncio and uvloop.

Every measurement runs in a subprocess of its own with the tree's ``loopwatch`` (or, with
``--baseline REF``, the package as of git revision REF, exported to a temporary directory and
put first on ``PYTHONPATH``), so both run side by side on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.plugin_cost import export_loopwatch

ROOT = Path(__file__).resolve().parent.parent

# Runs in the subprocess: ``python probe.py background|shutdown|testclient LOOP [REQUESTS]``;
# prints one JSON line.
PROBE = r"""
import asyncio
import contextlib
import json
import logging
import sys
import threading
import time

import httpx
import uvicorn
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from loopwatch import LoopWatchMiddleware

mode, loop_name = sys.argv[1], sys.argv[2]
registry = CollectorRegistry()
stalls = []
logged = []


class Lines(logging.Handler):
    def emit(self, record):
        if "event loop blocked" in record.getMessage():
            logged.append(record.getMessage())


logging.getLogger("loopwatch").addHandler(Lines())


async def background(request):
    return PlainTextResponse("ok", background=BackgroundTask(asyncio.sleep, 1.0))


async def block(request):
    time.sleep(0.4)  # blocks the loop
    return PlainTextResponse("blocked")


@contextlib.asynccontextmanager
async def lifespan(app):
    yield
    if mode == "shutdown":
        time.sleep(0.4)  # blocks the loop at shutdown


async def index(request):
    return PlainTextResponse("ok")


routes = [Route("/", index), Route("/bg", background), Route("/block", block)]
app = Starlette(routes=routes, lifespan=lifespan)
app.add_middleware(LoopWatchMiddleware, registry=registry, on_stall=stalls.append, threshold=0.1)


def stall_count():
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "loopwatch_stall_duration_seconds_count":
                total += sample.value
    return total


def serve():
    port_sock = __import__("socket").socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop=loop_name,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            sys.exit("uvicorn did not start")
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


if mode == "background":
    server, thread, url = serve()
    requests = int(sys.argv[3])
    rows = []
    with httpx.Client() as client:
        client.get(url + "/")  # the monitor bound, the connection open
        for _ in range(requests):
            before = registry.get_sample_value(
                "loopwatch_request_duration_seconds_sum", {"method": "GET", "route": "/bg"}
            ) or 0.0
            high = []
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    value = registry.get_sample_value("loopwatch_requests_in_flight") or 0.0
                    if value > 0:
                        high.append(time.perf_counter())
                    stop.wait(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            started = time.perf_counter()
            sampler.start()
            response = client.get(url + "/bg")
            assert response.text == "ok"
            client_s = time.perf_counter() - started
            time.sleep(1.5)  # the background task is over
            stop.set()
            sampler.join()
            after = registry.get_sample_value(
                "loopwatch_request_duration_seconds_sum", {"method": "GET", "route": "/bg"}
            ) or 0.0
            rows.append({
                "client_s": client_s,
                "recorded_s": after - before,
                "in_flight_s": (high[-1] - started) if high else 0.0,
            })
    server.should_exit = True
    thread.join(10)
    print(json.dumps(rows))
elif mode == "shutdown":
    server, thread, url = serve()
    httpx.get(url + "/")
    server.should_exit = True
    thread.join(10)
    print(json.dumps({"on_stall": len(stalls), "log": len(logged), "metric": stall_count()}))
elif mode == "testclient":
    from starlette.testclient import TestClient

    options = {"use_uvloop": True} if loop_name == "uvloop" else {}
    with TestClient(app, backend_options=options) as client:
        assert client.get("/block").text == "blocked"
    print(json.dumps({"on_stall": len(stalls), "log": len(logged), "metric": stall_count()}))
"""


def _probe(probe: Path, env: dict[str, str], *args: str) -> object:
    proc = subprocess.run(
        [sys.executable, str(probe), *args], env=env, capture_output=True, text=True, timeout=120
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.exit(f"probe {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lifecycle", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per cell in (b)")
    parser.add_argument("--requests", type=int, default=3, help="requests in (a)")
    parser.add_argument("--baseline", metavar="REF", help="also measure loopwatch at git REF")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], action="append")
    args = parser.parse_args(argv)
    loops = args.loop or ["asyncio", "uvloop"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="loopwatch-lifecycle-") as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(PROBE)
        trees = {"tree": env}
        if args.baseline:
            old = export_loopwatch(args.baseline, Path(tmp) / "baseline")
            trees[args.baseline] = {
                **env,
                "PYTHONPATH": os.pathsep.join([str(old), env["PYTHONPATH"]]),
            }

        print("(a) BackgroundTask awaiting 1 s after an immediate answer, uvicorn; median of "
              f"{args.requests} requests")  # fmt: skip
        print("| loopwatch | loop | client full response ms | recorded duration ms "
              "| in flight > 0 for ms |")  # fmt: skip
        print("|---|---|---:|---:|---:|")
        for tree, tree_env in trees.items():
            for loop in loops:
                rows = _probe(probe, tree_env, "background", loop, str(args.requests))
                assert isinstance(rows, list)
                cells = [
                    statistics.median(row[key] for row in rows) * 1000
                    for key in ("client_s", "recorded_s", "in_flight_s")
                ]
                # in flight never seen above 0: shorter than the 5 ms sampling period
                shown = [f"{c:.1f}" for c in cells[:2]] + [f"{cells[2]:.1f}" if cells[2] else "< 5"]
                print(f"| {tree} | {loop} | " + " | ".join(shown) + " |", flush=True)

        print()
        print(f"(b) a 0.4 s stall at the app's end: runs (of {args.runs}) that report it")
        print("| loopwatch | case | loop | on_stall | log line | metric |")
        print("|---|---|---|---:|---:|---:|")
        cases = {
            "uvicorn, lifespan shutdown handler": "shutdown",
            'TestClient, get("/block") then exit': "testclient",
        }
        for tree, tree_env in trees.items():
            for case, mode in cases.items():
                for loop in loops:
                    seen = {"on_stall": 0, "log": 0, "metric": 0}
                    for _ in range(args.runs):
                        found = _probe(probe, tree_env, mode, loop)
                        assert isinstance(found, dict)
                        for key in seen:
                            seen[key] += found[key] > 0
                    print(f"| {tree} | {case} | {loop} | "
                          + " | ".join(f"{seen[k]}/{args.runs}" for k in seen) + " |",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
