"""Frameworks other than Starlette, each under its usual server (uvicorn here, asyncio and
uvloop) with real HTTP: a blocking route and an innocent one, and every view (the stall,
its log line's route, the stall and request counters, the loop time) names the blocking
route by its template in the framework's own syntax, never the concrete path."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loopwatch import LoopWatchMiddleware
from tests.helpers import StallLog, by_route, eventually, text_samples
from tests.serving import serve

BLOCK = 0.3


def _by_route(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return by_route(text_samples(generate_latest(registry).decode(), name))


def _drive(url: str, blocking: str, innocent: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            blocked = pool.submit(httpx.get, url + blocking, timeout=10)
            beside = pool.submit(httpx.get, url + innocent, timeout=10)
            assert blocked.result().status_code == 200
            assert beside.result().status_code == 200
    assert httpx.get(url + "/missing/7", timeout=10).status_code == 404


def _assert_views(registry: CollectorRegistry, log: StallLog, template: str, ok: str) -> None:
    log.wait_for(2)
    # a request is counted at its last body chunk, which the client may not wait for
    expected = {template: 2, ok: 2, "<unmatched>": 1}
    eventually(lambda: _by_route(registry, "loopwatch_requests_total") == expected)
    assert {s.route for s in log.stalls} == {template}
    assert all(s.duration == pytest.approx(BLOCK, abs=0.15) for s in log.stalls)
    assert _by_route(registry, "loopwatch_stalls_total") == {template: 2}
    # loop time is drained into the counters every 0.25 s
    eventually(
        lambda: (
            _by_route(registry, "loopwatch_event_loop_busy_seconds_total").get(template, 0)
            >= 2 * BLOCK * 0.9
        ),
        what="the blocking route's loop time",
    )
    busy = _by_route(registry, "loopwatch_event_loop_busy_seconds_total")
    assert busy.get(ok, 0) < 0.1, busy


def litestar_app(registry: CollectorRegistry, log: StallLog) -> Any:
    pytest.importorskip("litestar", reason="not in the oldest-FastAPI matrix cell (pydantic)")
    from litestar import Litestar, get

    @get("/items/{item_id:int}/block")
    async def block(item_id: int) -> dict[str, int]:
        time.sleep(BLOCK)
        return {"item": item_id}

    @get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    return LoopWatchMiddleware(
        Litestar(route_handlers=[block, ok]), registry=registry, on_stall=log
    )


# the path parameter's inferred style, the tutorial's, warns from Litestar 2.19 (FromPath)
@pytest.mark.filterwarnings("ignore:.*deprecated inferred style:DeprecationWarning")
def test_litestar(loop_impl: str, registry: CollectorRegistry) -> None:
    log = StallLog()
    with serve(litestar_app(registry, log), loop=loop_impl) as url:
        _drive(url, "/items/7/block", "/ok")
        _assert_views(registry, log, "/items/{item_id:int}/block", "/ok")


def test_quart(loop_impl: str, registry: CollectorRegistry) -> None:
    from tests.quart_app import app

    log = StallLog()
    with serve(LoopWatchMiddleware(app, registry=registry, on_stall=log), loop=loop_impl) as url:
        _drive(url, "/items/7/block", "/ok")
        _assert_views(registry, log, "/items/<int:item_id>/block", "/ok")


def test_django(loop_impl: str, registry: CollectorRegistry) -> None:
    from tests.django_app import application

    log = StallLog()
    wrapped = LoopWatchMiddleware(application, registry=registry, on_stall=log)
    with serve(wrapped, loop=loop_impl, lifespan="off") as url:
        _drive(url, "/items/7/block", "/ok")
        _assert_views(registry, log, "items/<int:item_id>/block", "ok")


def test_aiohttp(loop_impl: str, registry: CollectorRegistry) -> None:
    """aiohttp's own server; its middleware (``loopwatch.aiohttp.setup``) and its metrics
    handler, which serves what ``metrics_app()`` serves."""
    import asyncio

    from aiohttp import web

    import loopwatch.aiohttp
    from tests.aiohttp_app import make_app
    from tests.serving import free_port
    from tests.unit.test_monitor import LoopThread

    log = StallLog()
    app = make_app()
    loopwatch.aiohttp.setup(app, registry=registry, on_stall=log)
    assert loopwatch.aiohttp.setup(app) is loopwatch.aiohttp.setup(app)  # once per app
    app.router.add_get("/metrics{tail:.*}", loopwatch.aiohttp.metrics_handler(registry))
    loop_thread = LoopThread(loop_impl)
    loop = loop_thread.loop
    port = free_port()
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        url = f"http://127.0.0.1:{port}"
        _drive(url, "/items/7/block", "/ok")
        _assert_views(registry, log, "/items/{item_id}/block", "/ok")
        scrape = httpx.get(url + "/metrics", timeout=5)
        assert scrape.status_code == 200
        stall_lines = [line for line in scrape.text.splitlines() if "stalls_total{" in line]
        assert any('route="/items/{item_id}/block"} 2.0' in line for line in stall_lines), (
            stall_lines
        )
        ring = httpx.get(url + "/metrics/stalls", timeout=5).json()
        assert {s["route"] for s in ring} >= {"/items/{item_id}/block"}
        assert httpx.post(url + "/ok", timeout=5).status_code == 405  # aiohttp's own answer
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop_thread.close()
