"""The loop profile's shares against what the app did, on a real uvicorn subprocess (asyncio
and uvloop; the loop on the main thread, where the loop thread samples itself on its CPU clock).

A sampler thread that samples when it gets the GIL put the samples of short CPU slices at the
socket write that follows them (asyncio: none of 6,000 ms in the work) or in the first of two
equal functions (uvloop: 92 %)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Response

from loopwatch import LoopWatchMiddleware, metrics_app
from loopwatch.profile import parse_collapsed
from tests.helpers import burn_first, burn_second
from tests.serving import LOOPS, serve_process, server_output

ROOT = Path(__file__).resolve().parents[2]

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/then-write")
async def then_write() -> Response:
    burn_first(0.002)
    burn_second(0.002)
    return Response(b"x" * 65536, media_type="application/octet-stream")


@app.get("/sleep-and-compute")
async def sleep_and_compute() -> dict[str, str]:
    time.sleep(0.02)  # the loop thread off its CPU: the watchdog's samples hold this
    burn_first(0.02)
    return {}


app.mount("/metrics", metrics_app())
app.add_middleware(LoopWatchMiddleware, threshold=1.0)


def _load(url: str, path: str, requests: int) -> None:
    # the client in another process: in the server's it would take the GIL at moments of its own
    command = [sys.executable, "-m", "benchmarks.load", "--port", url.rpartition(":")[2],
               "--path", path, "--connections", "3", "--requests", str(requests),
               "--duration", "120"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["requests"] == requests, done.stdout


def _route_stacks(url: str, route: str) -> dict[tuple[str, ...], int]:
    time.sleep(0.5)  # the watchdog stores the last samples
    text = httpx.get(f"{url}/metrics/profile", timeout=10).text
    return {s[1:]: c for s, c in parse_collapsed(text) if s[0] == f"GET {route}"}


def _share(stacks: dict[tuple[str, ...], int], function: str) -> float:
    total = sum(stacks.values())
    return sum(c for s, c in stacks.items() if any(function in f for f in s)) / total


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU-time timer: Linux")
@pytest.mark.parametrize("loop", LOOPS)
def test_short_slices_before_a_socket_write_are_sampled_where_they_run(loop: str) -> None:
    target = "tests.servers.test_profile_shares:app"
    with serve_process(target, args=("--loop", loop)) as (url, proc):
        _load(url, "/then-write", 1500)  # 6 s of the two functions' CPU
        stacks = _route_stacks(url, "/then-write")
        assert sum(stacks.values()) > 3000, (stacks, server_output(proc))
        first, second = _share(stacks, "burn_first"), _share(stacks, "burn_second")
        # each is about 45 % of the route's loop time (the rest: routing, the response)
        assert 0.3 <= first <= 0.6 and 0.3 <= second <= 0.6, (first, second, stacks)
        assert abs(first - second) <= 0.15, (first, second)


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU-time timer: Linux")
@pytest.mark.parametrize("loop", LOOPS)
def test_time_off_the_cpu_inside_a_route_is_still_in_the_profile(loop: str) -> None:
    # the timer counts CPU only: the watchdog samples the rest of the loop time
    target = "tests.servers.test_profile_shares:app"
    with serve_process(target, args=("--loop", loop)) as (url, proc):
        _load(url, "/sleep-and-compute", 200)  # 4 s asleep, 4 s computing
        stacks = _route_stacks(url, "/sleep-and-compute")
        total = sum(stacks.values())
        assert total > 5000, (stacks, server_output(proc))
        asleep = sum(c for s, c in stacks.items() if "sleep_and_compute" in s[-1])
        computing = sum(c for s, c in stacks.items() if "burn_first" in s[-1])
        assert 0.3 <= asleep / total <= 0.7 and 0.3 <= computing / total <= 0.7, stacks
        # about as much of each (0.79-1.03 measured, with other jobs on the machine)
        assert 0.65 <= asleep / computing <= 1.5, (asleep, computing)
