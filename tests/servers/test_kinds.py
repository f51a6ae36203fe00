"""What kind of hold it was, on a real uvicorn (asyncio and uvloop): a C call that keeps the
GIL (``gil``: the watchdog itself cannot run until it returns), CPU work that lets the GIL go
(``cpu``), the garbage collector (``gc``) and a wait (``wait``), each with its route and the
app line that made it, the same in every view.

Each workload is sized at start-up to take about 0.4 s on this machine (threshold 0.1 s).
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import pydantic
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loopwatch import LoopWatchMiddleware, metrics_app
from tests.helpers import StallLog, sample
from tests.serving import serve

TARGET = 0.4


def _sized(make: Callable[[int], Callable[[], object]], n: int) -> int:
    """The n for which ``make(n)()`` takes about TARGET seconds here."""
    for _ in range(20):
        work = make(n)
        began = time.perf_counter()
        work()
        took = time.perf_counter() - began
        if 0.8 * TARGET <= took <= 1.5 * TARGET:
            break
        n = n * 4 if took < TARGET / 4 else max(1, int(n * TARGET / took))
    return n


NUMBERS = pydantic.TypeAdapter(list[int])


def _json_numbers(n: int) -> str:
    # numbers, not objects: parsing them allocates nothing the garbage collector tracks
    return json.dumps(list(range(n)))


@pytest.fixture(scope="module")
def sizes() -> dict[str, Any]:
    json_n = _sized(lambda n: (lambda text: lambda: json.loads(text))(_json_numbers(n)), 100_000)
    body_n = _sized(
        lambda n: (lambda text: lambda: NUMBERS.validate_json(text))(_json_numbers(n)), 100_000
    )
    return {
        "factorial": _sized(lambda n: lambda: math.factorial(n), 20_000),
        "json": _json_numbers(json_n),
        "pydantic": _json_numbers(body_n),
        "pbkdf2": _sized(
            lambda n: lambda: hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", n), 20_000
        ),
        # a large heap of tracked objects, kept alive: each full collection is long
        "garbage": [[i] for i in range(1_000_000)],
    }


def _line_of(fn: Callable[..., Any], marker: str) -> int:
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if marker in line)


def build_app(registry: CollectorRegistry, log: StallLog, sizes: dict[str, Any]) -> FastAPI:
    app = FastAPI()
    garbage = sizes["garbage"]

    @app.get("/factorial")
    async def factorial() -> dict[str, int]:
        digits = math.factorial(sizes["factorial"]).bit_length()  # MARK factorial
        return {"bits": digits}

    @app.get("/json")
    async def parse_json() -> dict[str, int]:
        items = json.loads(sizes["json"])  # MARK json
        return {"items": len(items)}

    @app.post("/pydantic")
    async def validate() -> dict[str, int]:
        items = NUMBERS.validate_json(sizes["pydantic"])  # MARK pydantic
        return {"items": len(items)}

    @app.get("/pbkdf2")
    async def derive() -> dict[str, int]:
        key = hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", sizes["pbkdf2"])  # MARK pbkdf2
        return {"len": len(key)}

    @app.get("/gc")
    async def collect() -> dict[str, int]:
        began = time.perf_counter()
        while time.perf_counter() - began < TARGET:
            gc.collect()  # MARK gc
        return {"kept": len(garbage)}

    @app.get("/sleep")
    async def sleep() -> dict[str, str]:
        time.sleep(TARGET)  # MARK sleep
        return {}

    app.mount("/metrics", metrics_app(registry))
    app.add_middleware(LoopWatchMiddleware, registry=registry, on_stall=log, threshold=0.1)
    app.state.endpoints = {
        "factorial": factorial,
        "json": parse_json,
        "pydantic": validate,
        "pbkdf2": derive,
        "gc": collect,
        "sleep": sleep,
    }
    return app


CASES = [
    # (route, method, kind): one C call keeping the GIL, one releasing it, the GC, a wait
    ("factorial", "GET", "gil"),
    ("json", "GET", "gil"),
    ("pydantic", "POST", "gil"),
    ("pbkdf2", "GET", "cpu"),
    ("gc", "GET", "gc"),
    ("sleep", "GET", "wait"),
]


@pytest.mark.parametrize("name,method,kind", CASES, ids=[c[0] for c in CASES])
def test_each_kind_is_named_with_its_route_and_line(
    loop_impl: str, registry: CollectorRegistry, sizes: dict[str, Any],
    name: str, method: str, kind: str,
) -> None:  # fmt: skip
    log = StallLog()
    app = build_app(registry, log, sizes)
    endpoint = app.state.endpoints[name]
    line = _line_of(endpoint, f"# MARK {name}")
    repeats = 3
    with serve(app, loop=loop_impl) as url:
        for _ in range(repeats):
            response = httpx.request(method, f"{url}/{name}", timeout=30)
            assert response.status_code == 200
            time.sleep(0.3)  # the loop free between two: one stall each
        stalls = log.wait_for(repeats)
        page = httpx.get(f"{url}/metrics/ui/stalls.json", timeout=10).json()["stalls"]
    mine = [s for s in stalls if s.route == f"/{name}"]
    print([(s.route, s.kind, round(s.duration, 3), s.culprit) for s in stalls])
    assert len(mine) == repeats, stalls
    for stall in mine:
        assert stall.method == method
        assert stall.kind == kind, (stall.kind, stall.duration, stall.cpu_seconds, stall.culprit)
        assert 0.1 < stall.duration < 3
    # the line that made the call: the watchdog reads it as the call returns, and on a busy
    # machine it may get the GIL a step late (BENCHMARKS.md counts how often, quiet)
    culprit = f"test_kinds.py:{line} in {endpoint.__name__}"
    assert sum(s.culprit.endswith(culprit) for s in mine) >= repeats - 1, mine
    # every view says the same: the histogram's kind label, and the page's stalls
    counted = sample(
        registry, "loopwatch_stall_duration_seconds_count",
        method=method, route=f"/{name}", kind=kind,
    )  # fmt: skip
    assert counted == repeats
    shown = [s for s in page if s["route"] == f"/{name}"]
    assert [s["kind"] for s in shown] == [kind] * repeats
    if kind == "gc":
        for stall in mine:
            assert stall.gc_seconds >= 0.5 * stall.duration and stall.gc_generation == 2
            assert "garbage collection" in stall.describe()
        assert all(s["gc_seconds"] > 0.05 and s["gc_generation"] == 2 for s in shown)
    else:
        assert all(s.gc_seconds < 0.5 * s.duration for s in mine)
