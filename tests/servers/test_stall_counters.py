"""Live stall counters: seconds booked while a stall lasts, and zero series from start-up, so
that ``rate()``/``increase()`` see a freeze as it happens and count a route's first stall."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from loopwatch import BACKGROUND, LoopWatchMiddleware, metrics_app
from loopwatch.routes import declared_routes
from tests.helpers import StallLog, sample, series
from tests.serving import free_port, serve


def routed_app(registry: CollectorRegistry, **options: object) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    api = APIRouter(prefix="/api")

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    v2 = APIRouter(prefix="/v2")

    @v2.post("/orders/{order_id}")
    async def order(order_id: str) -> dict[str, str]:
        return {"id": order_id}

    api.include_router(v2)
    app.include_router(api)

    @app.get("/block")
    async def block(seconds: float = 1.5) -> dict[str, str]:
        time.sleep(seconds)
        return {}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    # its own endpoint: old Starlette (< 0.28) names a route by its endpoint function, so two
    # routes sharing one would share a template there (README, Limits)
    async def deep_x(request: Request) -> PlainTextResponse:
        return PlainTextResponse("x")

    class Things(HTTPEndpoint):  # a class endpoint: its methods are its handler methods
        async def get(self, request: Request) -> PlainTextResponse:
            return PlainTextResponse("things")

    app.mount(
        "/t/{tenant}",
        Starlette(routes=[Route("/hello", hello), Mount("/deep", routes=[Route("/x", deep_x)])]),
    )
    app.router.routes.append(Route("/things", Things))
    app.add_middleware(LoopWatchMiddleware, registry=registry, **options)  # type: ignore[arg-type]
    app.mount("/metrics", metrics_app(registry))
    return app


EXPECTED = {
    ("-", BACKGROUND),
    ("GET", "/api/items/{item_id}"),
    ("POST", "/api/v2/orders/{order_id}"),
    ("GET", "/block"),
    ("WS", "/ws"),
    ("GET", "/t/{tenant}/hello"),
    ("GET", "/t/{tenant}/deep/x"),
    ("GET", "/things"),
}
# where a stall before routing is booked while it lasts, one per method the app declares
PLACEHOLDERS = {("GET", "<routing>"), ("POST", "<routing>"), ("WS", "<routing>")}


def stall_series(registry: CollectorRegistry, name: str) -> set[tuple[str, str]]:
    return {(s["method"], s["route"]) for s in series(registry, name)}


def test_every_declared_route_has_zero_series_from_start_up(registry: CollectorRegistry) -> None:
    with TestClient(routed_app(registry)):  # lifespan start-up, no request yet
        for name in ("loopwatch_stall_seconds_total", "loopwatch_stalls_total"):
            assert stall_series(registry, name) == EXPECTED | PLACEHOLDERS
            zero = EXPECTED | PLACEHOLDERS
            assert all(sample(registry, name, method=m, route=r) == 0 for m, r in zero)
        assert series(registry, "loopwatch_stall_in_progress_seconds") == []
        # a hold before routing is <routing>'s in loop time too: the same zero series
        busy = stall_series(registry, "loopwatch_event_loop_busy_seconds_total")
        assert busy >= EXPECTED | PLACEHOLDERS, busy


def test_declared_templates_are_the_ones_requests_are_counted_under(
    registry: CollectorRegistry,
) -> None:
    app = routed_app(registry)
    declared = declared_routes(app)
    with TestClient(app) as client:
        assert client.get("/api/items/7").status_code == 200
        assert client.post("/api/v2/orders/abc").status_code == 200
        assert client.get("/block", params={"seconds": 0}).status_code == 200
        assert client.get("/t/acme/hello").status_code == 200
        assert client.get("/t/acme/deep/x").status_code == 200
        with client.websocket_connect("/ws"):
            pass
        assert client.get("/things").status_code == 200
    counted = {(s["method"], s["route"]) for s in series(registry, "loopwatch_requests_total")}
    assert declared == EXPECTED - {("-", BACKGROUND)}
    assert declared <= counted


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


BLOCK = (("method", "GET"), ("route", "/block"))


def test_stall_seconds_grow_while_the_stall_lasts(
    loop_impl: str, registry: CollectorRegistry
) -> None:
    port = free_port()
    log = StallLog()
    app = routed_app(registry, metrics_port=port, threshold=0.25, on_stall=log)
    with serve(app, loop=loop_impl) as url:
        before = _scrape(port)
        assert before[("loopwatch_stalls_total", BLOCK)] == 0
        blocker = threading.Thread(target=httpx.get, args=(f"{url}/block",), kwargs={"timeout": 10})
        started = time.monotonic()
        blocker.start()
        readings: list[tuple[float, float, float | None]] = []
        while blocker.is_alive():  # the 1.5 s stall is in progress
            now = _scrape(port)
            readings.append(
                (
                    time.monotonic() - started,
                    now[("loopwatch_stall_seconds_total", BLOCK)],
                    now.get(("loopwatch_stall_in_progress_seconds", BLOCK)),
                )
            )
            time.sleep(0.1)
        blocker.join()
        log.wait_for(1)
        after = _scrape(port)
    during = [r for r in readings if r[1] > 0]
    assert len(during) >= 4, readings  # booked while the loop was frozen...
    booked = [r[1] for r in during]
    assert booked == sorted(booked) and booked[-1] - booked[0] > 0.4, readings  # ...growing
    # the route's stall in progress is shown with it (a reading after the stall ended, as
    # the response is still on its way, has the final count and no gauge)
    live = [r for r in during if r[2] is not None]
    assert len(live) >= 3, readings
    # never ahead of the stall's own age in the same scrape (so rate() of one loop stays
    # within 0..1), and at most a few checks behind it
    assert all(r[2] - 0.05 <= r[1] <= r[2] + 1e-3 for r in live), readings
    stall = log.stalls[0]
    assert after[("loopwatch_stalls_total", BLOCK)] == 1
    assert after[("loopwatch_stall_seconds_total", BLOCK)] == pytest.approx(
        stall.duration, abs=1e-6
    )
    hist_sum = after[("loopwatch_stall_duration_seconds_sum", (("kind", stall.kind), *BLOCK))]
    assert hist_sum == pytest.approx(stall.duration, abs=1e-6)
    assert ("loopwatch_stall_in_progress_seconds", BLOCK) not in after
    assert after[("loopwatch_current_stall_seconds", ())] == 0


def test_a_short_first_stall_is_counted_from_zero(
    loop_impl: str, registry: CollectorRegistry
) -> None:
    log = StallLog()
    app = routed_app(registry, threshold=0.25, on_stall=log)
    with serve(app, loop=loop_impl) as url:
        # present at 0 (not merely absent) before the stall
        labels = {"method": "GET", "route": "/block"}
        assert registry.get_sample_value("loopwatch_stalls_total", labels) == 0
        httpx.get(f"{url}/block", params={"seconds": 0.4}, timeout=10)
        stall = log.wait_for(1)[0]
    assert sample(registry, "loopwatch_stalls_total", method="GET", route="/block") == 1
    seconds = sample(registry, "loopwatch_stall_seconds_total", method="GET", route="/block")
    assert seconds == pytest.approx(stall.duration, abs=1e-6)
    assert 0.38 <= seconds <= 0.6


def test_background_stall_is_booked_under_background(
    loop_impl: str, registry: CollectorRegistry
) -> None:
    log = StallLog()
    app = routed_app(registry, threshold=0.25, on_stall=log)

    @app.get("/later")
    async def later() -> dict[str, str]:
        # scheduled outside any request's context: background code (one the request's own
        # context schedules is the request's: tests/servers/test_ownership.py)
        loop = asyncio.get_running_loop()
        contextvars.Context().run(loop.call_later, 0.05, lambda: time.sleep(0.5))
        return {}

    with serve(app, loop=loop_impl) as url:
        httpx.get(f"{url}/later", timeout=5)
        stall = log.wait_for(1)[0]
    assert stall.route == BACKGROUND
    assert sample(registry, "loopwatch_stalls_total", method="-", route=BACKGROUND) == 1
    assert sample(
        registry, "loopwatch_stall_seconds_total", method="-", route=BACKGROUND
    ) == pytest.approx(stall.duration, abs=1e-6)


ROUTING = (("method", "GET"), ("route", "<routing>"))


@pytest.mark.parametrize("then", ["routes", "awaits"])
def test_a_stall_before_routing_is_booked_while_it_lasts(
    then: str, loop_impl: str, registry: CollectorRegistry
) -> None:
    """A middleware inside loopwatch holds the loop before the router runs (an auth check):
    its seconds grow under the fixed <routing> placeholder while it lasts, with its stall in
    progress, and are never moved; the delivered stall, its histogram and its loop time name
    <routing> too (one owner per hold). ``awaits``: the middleware then awaits before
    routing, so the stall ends before its route is known, and is still booked once, under
    <routing>."""
    port = free_port()
    log = StallLog()

    class SlowAuth:  # pure ASGI, inside loopwatch: before routing
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope.get("query_string") == b"auth=slow":
                time.sleep(1.5)
                if then == "awaits":
                    await asyncio.sleep(0.3)  # the watchdog closes the hold before routing
            await self.app(scope, receive, send)

    app = routed_app(registry, metrics_port=port, threshold=0.25, on_stall=log)
    app.user_middleware.append(Middleware(SlowAuth))  # the innermost: inside loopwatch
    with serve(app, loop=loop_impl) as url:
        before = _scrape(port)
        assert before[("loopwatch_stall_seconds_total", ROUTING)] == 0
        blocker = threading.Thread(
            target=httpx.get, args=(f"{url}/api/items/1?auth=slow",), kwargs={"timeout": 10}
        )
        started = time.monotonic()
        blocker.start()
        readings: list[tuple[float, float, float | None]] = []
        while blocker.is_alive():
            now = _scrape(port)
            readings.append((
                time.monotonic() - started,
                now[("loopwatch_stall_seconds_total", ROUTING)],
                now.get(("loopwatch_stall_in_progress_seconds", ROUTING)),
            ))  # fmt: skip
            time.sleep(0.1)
        blocker.join()
        [stall] = log.wait_for(1)
        after = _scrape(port)
    during = [r for r in readings if r[1] > 0]
    assert len(during) >= 4, readings
    booked = [r[1] for r in during]
    assert booked == sorted(booked) and booked[-1] - booked[0] > 0.4, readings
    live = [r for r in during if r[2] is not None]
    assert len(live) >= 3, readings
    assert all(r[2] - 0.05 <= r[1] <= r[2] + 1e-3 for r in live), readings
    # the whole stall stays where it was booked, and every view names that owner
    assert stall.route == "<routing>"
    assert after[("loopwatch_stall_seconds_total", ROUTING)] == pytest.approx(
        stall.duration, abs=1e-6
    )
    assert after[("loopwatch_stalls_total", ROUTING)] == 1
    item = (("method", "GET"), ("route", "/api/items/{item_id}"))
    assert after[("loopwatch_stall_seconds_total", item)] == 0
    hist = after[("loopwatch_stall_duration_seconds_count", (("kind", stall.kind), *ROUTING))]
    assert hist == 1
    assert (
        after.get(("loopwatch_stall_duration_seconds_count", (("kind", stall.kind), *item))) is None
    )
    busy = after[("loopwatch_event_loop_busy_seconds_total", ROUTING)]
    assert busy >= 0.8 * stall.duration, after
