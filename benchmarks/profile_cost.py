"""What the loop profile costs: the watchdog thread's CPU per second of wall time with the
profile on and off (a real uvicorn under steady load, then idle), and the store's memory
when every cap is reached. ``python -m benchmarks.profile_cost [--loop uvloop]``."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import tracemalloc

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loopwatch import LoopWatchMiddleware
from loopwatch.profile import (
    KEEP_SECONDS,
    MAX_DEPTH,
    MAX_NAME,
    MAX_OVERFLOW,
    MAX_STACKS,
    MAX_TOTAL,
    PROFILE,
    ProfileStore,
)
from tests.serving import serve


def app(profile: bool) -> FastAPI:
    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @api.get("/work")
    async def work() -> dict[str, str]:
        started = time.perf_counter()
        while time.perf_counter() - started < 0.004:
            pass
        await asyncio.sleep(0)
        return {}

    api.add_middleware(LoopWatchMiddleware, registry=CollectorRegistry(), profile=profile)  # type: ignore[arg-type]
    return api


def watchdog_cpu() -> float:
    threads = [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"]
    return sum(time.clock_gettime(time.pthread_getcpuclockid(t.ident or 0)) for t in threads)


async def load(url: str, seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                await client.get("/work")
                done += 1

        await asyncio.gather(*(worker() for _ in range(4)))
    return done


def measure(profile: bool, loop: str, seconds: float) -> tuple[float, float, int]:
    """(watchdog CPU % of a core under load, idle, requests served)"""
    with serve(app(profile), loop=loop) as url:
        time.sleep(0.5)
        cpu0, t0 = watchdog_cpu(), time.monotonic()
        served = asyncio.run(load(url, seconds))
        busy = (watchdog_cpu() - cpu0) / (time.monotonic() - t0)
        cpu0, t0 = watchdog_cpu(), time.monotonic()
        time.sleep(seconds)
        idle = (watchdog_cpu() - cpu0) / (time.monotonic() - t0)
    return 100 * busy, 100 * idle, served


def worst_case_memory() -> float:
    """MiB held by a store at every cap: each second full (MAX_STACKS stacks, MAX_OVERFLOW
    overflow lines), MAX_TOTAL distinct stacks of MAX_DEPTH frames in the window."""
    now = [0.0]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = ProfileStore(clock=lambda: now[0])
    # the sampler makes one name per code line; stacks differ in their leaf
    frames = tuple(f"f{i} (/" + "p" * (MAX_NAME - 20) + f".py:{i})" for i in range(MAX_DEPTH - 1))
    for second in range(KEEP_SECONDS):
        now[0] = float(second)
        for i in range(MAX_STACKS):
            n = (second * MAX_STACKS + i) % MAX_TOTAL
            store.add((f"GET /r{n % 50}", *frames, f"leaf (/a.py:{n})"), 1000)
        for i in range(MAX_OVERFLOW):
            store.add((f"GET /o{i}", *frames, f"leaf (/b.py:{second})"), 1000)
    assert len(store._interned) <= MAX_TOTAL + MAX_OVERFLOW
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    print(f"store at every cap: {worst_case_memory():.1f} MiB")
    if args.memory_only:
        return
    for profile in (False, True, False, True):
        PROFILE.clear()
        busy, idle, served = measure(profile, args.loop, args.seconds)
        print(
            f"{args.loop} profile={'on ' if profile else 'off'}  watchdog CPU: "
            f"{busy:.2f}% of a core under load ({served / args.seconds:.0f} req/s), "
            f"{idle:.2f}% idle"
        )


if __name__ == "__main__":
    main()
