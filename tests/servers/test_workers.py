"""Several worker processes with PROMETHEUS_MULTIPROC_DIR: one scrape shows every worker's
stalls and loop time exactly once, and the threadpool gauges."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import text_samples as samples
from tests.serving import free_port, serve_process

# uvloop has no exact hook before 3.12: its loop time is sampled (and reads short holds low)
_UVLOOP_MODE = "exact" if sys.version_info >= (3, 12) else "sampled"
_AUTO_MODE = _UVLOOP_MODE if importlib.util.find_spec("uvloop") else "exact"


def test_two_workers_one_scrape_counts_every_stall_once(tmp_path: Path) -> None:
    side_port = free_port()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "LOOPWATCH_METRICS_PORT": str(side_port)}
    with serve_process("tests.workers_app:app", args=("--workers", "2"), env=env) as (url, _):

        async def blocked(client: httpx.AsyncClient, name: str, delay: float) -> int:
            await asyncio.sleep(delay)
            return int((await client.get(f"/block/{name}")).json()["pid"])

        async def blockers() -> list[int]:
            # staggered: while one worker's loop is held it cannot accept, so the next
            # connection goes to the other worker
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
                pids = []
                for r in range(3):
                    pids += await asyncio.gather(
                        blocked(client, f"{r}a", 0), blocked(client, f"{r}b", 0.15)
                    )
                return pids

        time.sleep(1.0)  # both workers up
        pids = asyncio.run(blockers())
        assert len(set(pids)) == 2, f"both workers must have blocked: {pids}"
        time.sleep(1.5)  # each worker mirrors its figures within a second
        text = httpx.get(f"{url}/metrics", timeout=10).text
        # the side port, bound by whichever worker started first, shows the same aggregate
        side = httpx.get(f"http://127.0.0.1:{side_port}/metrics", timeout=10).text
    assert samples(side, "loopwatch_stall_duration_seconds_count") == samples(
        text, "loopwatch_stall_duration_seconds_count"
    )
    stalls = samples(text, "loopwatch_stall_duration_seconds_count")
    key = (("kind", "wait"), ("method", "GET"), ("route", "/block/{name}"))
    assert stalls.get(key) == 6, stalls
    requests = samples(text, "loopwatch_requests_total")
    assert requests[(("method", "GET"), ("route", "/block/{name}"), ("status", "200"))] == 6
    seconds = samples(text, "loopwatch_stall_duration_seconds_sum")[key]
    assert 6 * 0.45 <= seconds <= 6 * 0.6
    # the live counters add up over workers too, and agree with the histogram
    route = (("method", "GET"), ("route", "/block/{name}"))
    assert samples(text, "loopwatch_stalls_total")[route] == 6
    assert samples(text, "loopwatch_stall_seconds_total")[route] == pytest.approx(seconds, abs=1e-6)
    assert (
        samples(text, "loopwatch_stalls_total")[(("method", "-"), ("route", "<background>"))] == 0
    )
    assert samples(text, "loopwatch_requests_in_flight") == {(): 0.0}
    pool = samples(text, "loopwatch_threadpool_size")
    assert pool == {(): 80.0}  # two workers, anyio's default 40 threads each
    # loop time sums the workers: 6 holds of 0.5 s, 3 in each (one worker alone has ~1.5 s)
    busy = samples(text, "loopwatch_event_loop_busy_seconds_total")
    assert 6 * 0.45 <= busy[route] <= 6 * 0.6 + 0.5, busy
    # sampled loop time (uvloop before 3.12) charges a check period to whoever runs at each
    # check: a hold's ends are off by up to one period (10 ms) each way; exact is within 50 ms
    slack = 0.05 + (6 * 0.01 if _AUTO_MODE == "sampled" else 0.0)
    assert busy[route] >= seconds - slack, (busy[route], seconds, _AUTO_MODE)
    # a declared route that got no request is there from start-up, at 0, in the sum too
    assert busy[(("method", "GET"), ("route", "/pid"))] == 0.0, busy
    assert samples(side, "loopwatch_event_loop_busy_seconds_total")[route] == pytest.approx(
        busy[route], abs=0.05
    )
    # loop time sums the workers, so a share divides by the loops watched: two (uvicorn's
    # "auto" loop is uvloop when installed), summed over the live workers
    loops = {dict(k)["loop_time"]: v for k, v in samples(text, "loopwatch_event_loops").items()}
    assert loops == {m: 2.0 * (m == _AUTO_MODE) for m in ("exact", "sampled", "off")}, loops
    assert samples(side, "loopwatch_event_loops") == samples(text, "loopwatch_event_loops")


@pytest.mark.parametrize(
    ("loop", "env", "mode"),
    [
        ("asyncio", {}, "exact"),
        ("uvloop", {}, _UVLOOP_MODE),
        ("asyncio", {"LOOPWATCH_LOOP_TIME": "0"}, "off"),
    ],
)
def test_one_process_exports_its_one_loop_and_how_it_is_timed(
    loop: str, env: dict[str, str], mode: str
) -> None:
    with serve_process("tests.workers_app:app", args=("--loop", loop), env=env) as (url, _):
        httpx.get(f"{url}/pid", timeout=5)
        text = httpx.get(f"{url}/metrics", timeout=5).text
    loops = {dict(k)["loop_time"]: v for k, v in samples(text, "loopwatch_event_loops").items()}
    assert loops == {m: float(m == mode) for m in ("exact", "sampled", "off")}, loops


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_paused_process_is_not_blamed_on_code(loop: str) -> None:
    # SIGSTOP freezes the whole process (a container freeze, a VM pause): the loop was idle,
    # no code held it, so there is no stall to report.
    with serve_process("tests.workers_app:app", args=("--loop", loop)) as (url, proc):
        httpx.get(f"{url}/pid", timeout=5)
        time.sleep(0.3)
        for _ in range(2):
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.3)
        httpx.get(f"{url}/block/real", timeout=10)  # and a real blocker still is
        time.sleep(0.3)
        stalls = httpx.get(f"{url}/metrics/stalls", timeout=5).json()
        text = httpx.get(f"{url}/metrics", timeout=5).text
    assert [(s["route"], s["kind"]) for s in stalls] == [("/block/{name}", "wait")]
    # nor is the pause booked while it lasts: only the real blocker's seconds are counted
    booked = {k: v for k, v in samples(text, "loopwatch_stall_seconds_total").items() if v}
    assert list(booked) == [(("method", "GET"), ("route", "/block/{name}"))], booked
