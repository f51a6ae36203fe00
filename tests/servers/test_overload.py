"""An idle server on a machine in overload reports no stall: its heartbeat comes late because
the process gets no CPU, not because code holds the loop (a real uvicorn subprocess on asyncio
and uvloop, pinned to one core with three CPU burners, the server at the lowest priority)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from loopwatch import LoopWatchMiddleware, metrics_app
from tests.serving import LOOPS, serve_process, server_output

app = FastAPI()


@app.get("/block")
async def block() -> dict[str, str]:
    time.sleep(0.4)  # the one real stall, after the overload: the watch still works
    return {}


app.mount("/metrics", metrics_app())
app.add_middleware(LoopWatchMiddleware, threshold=0.1)


def _threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


@contextlib.contextmanager
def overload(pid: int) -> Iterator[None]:
    """Every thread of ``pid`` pinned to one core at nice 19, with three busy loops there."""
    core = {min(os.sched_getaffinity(0))}
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)
    ]  # fmt: skip
    try:
        for burner in burners:
            os.sched_setaffinity(burner.pid, core)
        for tid in _threads(pid):
            os.sched_setaffinity(tid, core)
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        everywhere = os.sched_getaffinity(0)
        for tid in _threads(pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, everywhere)
            with contextlib.suppress(OSError):  # back to a normal priority (root may lower it)
                os.setpriority(os.PRIO_PROCESS, tid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="affinity and /proc: Linux")
@pytest.mark.parametrize("loop", LOOPS)
def test_an_idle_loop_under_overload_reports_no_stall(loop: str) -> None:
    with serve_process("tests.servers.test_overload:app", args=("--loop", loop)) as (url, proc):
        httpx.get(f"{url}/metrics", timeout=10)  # the monitor runs (started by a request)
        with overload(proc.pid):
            time.sleep(4)
        time.sleep(1.0)  # a stall would be closed and delivered by now
        stalls = httpx.get(f"{url}/metrics/stalls", timeout=10).json()
        assert stalls == [], (stalls, server_output(proc))
        assert httpx.get(f"{url}/block", timeout=10).status_code == 200
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stalls = httpx.get(f"{url}/metrics/stalls", timeout=10).json()
            if stalls:
                break
            time.sleep(0.1)
        assert [(s["route"], s["kind"]) for s in stalls] == [("/block", "wait")]
