"""One owner per hold, in every view: the cases of the README's "Who owns a hold" table, each
run on a real uvicorn (asyncio and uvloop) with a real HTTP client. For each, the stall's
``on_stall`` record, the ring, the log line, the stall counters, the histogram and loop time
the live page's data and ``loopwatch report`` all name the same (method, route), and no other
owner is charged with the hold; with a real OpenTelemetry SDK and FastAPI's instrumentation,
the stall's span names it too. loopwatch's own work and an idle server's are never the app's."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from loopwatch import LoopWatchMiddleware, recent_stalls
from tests.helpers import StallLog, eventually
from tests.otel_sdk import Otel
from tests.serving import free_port, serve

HOLD = 0.5  # well above the threshold: no test here depends on a busy machine's timing
THRESHOLD = 0.1
EXACT = sys.version_info >= (3, 12)  # uvloop: sys.monitoring sees task steps


COUNTED = (
    "loopwatch_stalls_total",
    "loopwatch_stall_seconds_total",
    "loopwatch_stall_duration_seconds_count",
    "loopwatch_event_loop_busy_seconds_total",
)


class Views:
    """What the side port shows a person: the live page's data and ``loopwatch report``."""

    def __init__(self, port: int) -> None:
        side = f"http://127.0.0.1:{port}"
        self.page_stalls = httpx.get(f"{side}/ui/stalls.json", timeout=10).json()["stalls"]
        self.page_routes = httpx.get(f"{side}/ui/routes.json", timeout=10).json()["routes"]
        self.report = subprocess.run(
            [sys.executable, "-m", "loopwatch", "report", f"{side}/metrics", "--plain"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip

    def report_stalls(self) -> dict[str, int]:
        """Stalls per row of the report's table ("GET /x", or a placeholder alone)."""
        lines = self.report.splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("route"))
        rows: dict[str, int] = {}
        for line in lines[start + 2 :]:
            if not re.match(r"^\s*(GET|POST|<)", line):
                break
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[0]] = int(cells[2])
        return rows


def _counters(registry: CollectorRegistry) -> dict[str, dict[tuple[str, ...], float]]:
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name not in COUNTED:
                continue
            key = (s.labels["method"], s.labels["route"])
            book = out.setdefault(s.name, {})
            book[key] = book.get(key, 0.0) + s.value
    return out


def _grew(
    before: dict[str, dict[tuple[str, ...], float]],
    after: dict[str, dict[tuple[str, ...], float]],
    name: str,
) -> dict[tuple[str, ...], float]:
    old = before.get(name, {})
    return {
        key: value - old.get(key, 0.0)
        for key, value in after.get(name, {}).items()
        if value - old.get(key, 0.0) > 0
    }


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    handler = LogLines()
    logger = logging.getLogger("loopwatch")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _block() -> None:
    time.sleep(HOLD)


def fastapi_app(
    registry: CollectorRegistry, log: StallLog, port: int = 0, sdk: Otel | None = None,
    **extra: Any,
) -> FastAPI:  # fmt: skip
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, **extra)

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {}

    @app.get("/request/{item}")
    async def in_request(item: int) -> dict[str, str]:
        _block()
        return {}

    @app.get("/child")
    async def in_child_task() -> dict[str, str]:
        await asyncio.create_task(asyncio.to_thread(lambda: None))  # a real await first
        task = asyncio.get_running_loop().create_task(_child())
        await task
        return {}

    @app.get("/callback")
    async def in_callback() -> dict[str, str]:
        done = asyncio.get_running_loop().create_future()

        def blocker() -> None:
            _block()
            done.set_result(None)

        asyncio.get_running_loop().call_later(0.01, blocker)
        await done
        return {}

    app.add_middleware(
        LoopWatchMiddleware, registry=registry, threshold=THRESHOLD, on_stall=log,
        metrics_port=port or None, **_providers(sdk),
    )  # fmt: skip
    if sdk is not None:  # outside loopwatch, as usual
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=sdk.tracer_provider, meter_provider=sdk.meter_provider
        )
    return app


def _providers(sdk: Otel | None) -> dict[str, Any]:
    if sdk is None:
        return {}
    return {"tracer_provider": sdk.tracer_provider, "meter_provider": sdk.meter_provider}


async def _child() -> None:
    await asyncio.sleep(0)
    _block()


class BeforeRouting:
    """A pure ASGI middleware inside loopwatch that holds the loop before the router runs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("query_string") == b"slow=1":
            _block()
        await self.app(scope, receive, send)


def no_router_app(registry: CollectorRegistry, log: StallLog, port: int, sdk: Otel) -> Any:
    async def plain(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/block":
            _block()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return LoopWatchMiddleware(
        plain, registry=registry, threshold=THRESHOLD, on_stall=log, metrics_port=port,
        **_providers(sdk),
    )  # fmt: skip


def _check_one_owner(
    owner: tuple[str, str],
    log: StallLog,
    lines: LogLines,
    before: dict[str, dict[tuple[str, ...], float]],
    after: dict[str, dict[tuple[str, ...], float]],
    views: Views,
    sdk: Otel,
    *,
    loop_time: bool,
) -> None:
    [stall] = log.wait_for(1)
    assert (stall.method, stall.route) == owner, stall
    assert HOLD * 0.9 <= stall.duration <= HOLD * 2, stall
    assert [(s.method, s.route) for s in recent_stalls()] == [owner]
    method, route = owner
    blocked = [line for line in lines.lines if line.startswith("event loop blocked for ")]
    assert blocked and all(f" by {method} {route} " in line for line in blocked), blocked
    assert _grew(before, after, "loopwatch_stalls_total") == {owner: 1}
    seconds = _grew(before, after, "loopwatch_stall_seconds_total")
    assert list(seconds) == [owner] and seconds[owner] == pytest.approx(stall.duration, abs=1e-6)
    assert _grew(before, after, "loopwatch_stall_duration_seconds_count") == {owner: 1}
    busy = _grew(before, after, "loopwatch_event_loop_busy_seconds_total")
    if loop_time:
        assert busy.get(owner, 0.0) >= 0.8 * HOLD, busy
    others = {k: v for k, v in busy.items() if k != owner}
    assert sum(others.values()) < 0.2 * HOLD, busy
    # the live page: its stall list and its route table
    assert [(s["method"], s["route"]) for s in views.page_stalls] == [owner]
    stalled = {(r["method"], r["route"]): r["stalls"] for r in views.page_routes if r["stalls"]}
    assert stalled == {owner: 1}, views.page_routes
    # loopwatch report, read from the side port
    label = f"{method} {route}" if method != "-" else route
    reported = {row: n for row, n in views.report_stalls().items() if n}
    assert reported == {label: 1}, views.report
    # the OpenTelemetry stall span
    eventually(lambda: len(sdk.named("loopwatch.stall")) == 1, what="the stall span")
    attributes = sdk.named("loopwatch.stall")[0].attributes or {}
    assert attributes["http.route"] == route
    assert attributes.get("http.request.method") == (None if method == "-" else method)


def _settle(registry: CollectorRegistry) -> None:
    del registry
    time.sleep(0.3)  # the watchdog's last check and the accountant's drain


CASES = {
    "request": ("/request/3", ("GET", "/request/{item}")),
    "child task": ("/child", ("GET", "/child")),
    "callback from a request": ("/callback", ("GET", "/callback")),
    "before routing": ("/ok?slow=1", ("GET", "<routing>")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hold_has_one_owner_in_every_view(
    case: str, loop_impl: str, registry: CollectorRegistry, log_lines: LogLines, otel: Otel
) -> None:
    path, owner = CASES[case]
    if case == "callback from a request" and loop_impl == "uvloop" and not EXACT:
        # uvloop runs the callback from C: no handle, no context to read; on 3.12+ the
        # loop-time hook times it and knows its context (README, Limits)
        owner = ("-", "<background>")
    log = StallLog()
    port = free_port()
    app = fastapi_app(registry, log, port, otel)
    if case == "before routing":
        app.user_middleware.append(Middleware(BeforeRouting))  # innermost: inside loopwatch
    with serve(app, loop=loop_impl) as url:
        assert httpx.get(url + "/ok", timeout=10).status_code == 200
        _settle(registry)
        before = _counters(registry)
        assert httpx.get(url + path, timeout=10).status_code == 200
        log.wait_for(1)
        _settle(registry)
        after = _counters(registry)
        views = Views(port)
    # loop time sees a plain callback where it sees its handle (pure-Python asyncio) or its
    # code (uvloop, 3.12+)
    seen = loop_impl == "asyncio" or EXACT
    _check_one_owner(owner, log, log_lines, before, after, views, otel, loop_time=seen)


@asynccontextmanager
async def blocking_lifespan(app: FastAPI) -> AsyncIterator[None]:
    await asyncio.sleep(0.05)  # a real await first (a database connecting)
    _block()
    yield


async def ticker() -> None:
    """A worker the app starts from its lifespan: it blocks once, then idles."""
    await asyncio.sleep(0.3)
    _block()
    await asyncio.sleep(3600)


@asynccontextmanager
async def ticker_lifespan(app: FastAPI) -> AsyncIterator[None]:
    task = asyncio.create_task(ticker())
    yield
    task.cancel()


LIFESPAN_CASES = {
    # the lifespan's own code runs in the server's task: the app's <background>, not <server>
    "lifespan code": (blocking_lifespan, ("-", "<background>")),
    # a task no request started is named by its coroutine, in every view and in loop time
    "a task the lifespan started": (ticker_lifespan, ("-", "<task ticker>")),
}


@pytest.mark.parametrize("case", list(LIFESPAN_CASES))
def test_a_hold_outside_requests_has_one_owner_in_every_view(
    case: str, loop_impl: str, registry: CollectorRegistry, log_lines: LogLines, otel: Otel
) -> None:
    lifespan, owner = LIFESPAN_CASES[case]
    log = StallLog()
    port = free_port()
    app = fastapi_app(registry, log, port, otel, lifespan=lifespan)
    before: dict[str, dict[tuple[str, ...], float]] = {}
    with serve(app, loop=loop_impl) as url:
        log.wait_for(1)
        assert httpx.get(url + "/ok", timeout=10).status_code == 200
        _settle(registry)
        after = _counters(registry)
        views = Views(port)
    _check_one_owner(owner, log, log_lines, before, after, views, otel, loop_time=True)


def test_a_hold_in_the_servers_protocol_code_is_the_server(
    loop_impl: str, registry: CollectorRegistry, log_lines: LogLines, otel: Otel
) -> None:
    """A protocol's ``data_received`` runs as a plain callback of the loop (no task, no
    request): the server's work, ``<server>``, in the stall views and in loop time."""
    log = StallLog()
    listening: list[int] = []

    class Blocking(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            _block()
            self.transport.close()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # listening from a context of no owner's, as the server's own sockets are (a socket
        # opened in the lifespan would be the lifespan's, <background>)
        loop = asyncio.get_running_loop()
        opening = loop.create_server(Blocking, "127.0.0.1", 0)
        server = await contextvars.Context().run(loop.create_task, opening)
        listening.append(server.sockets[0].getsockname()[1])
        yield
        server.close()

    port = free_port()
    app = fastapi_app(registry, log, port, otel, lifespan=lifespan)
    with serve(app, loop=loop_impl) as url:
        assert httpx.get(url + "/ok", timeout=10).status_code == 200
        _settle(registry)
        before = _counters(registry)
        with socket.create_connection(("127.0.0.1", listening[0]), timeout=10) as sock:
            sock.sendall(b"x")
            sock.recv(1)
        log.wait_for(1)
        _settle(registry)
        after = _counters(registry)
        views = Views(port)
    owner = ("-", "<server>")
    seen = loop_impl == "asyncio"
    _check_one_owner(owner, log, log_lines, before, after, views, otel, loop_time=seen)


def test_a_hold_in_an_app_with_no_router_is_unmatched_in_every_view(
    loop_impl: str, registry: CollectorRegistry, log_lines: LogLines, otel: Otel
) -> None:
    log = StallLog()
    port = free_port()
    app = no_router_app(registry, log, port, otel)
    try:
        with serve(app, loop=loop_impl) as url:
            assert httpx.get(url + "/", timeout=10).status_code == 200
            _settle(registry)
            before = _counters(registry)
            assert httpx.get(url + "/block", timeout=10).status_code == 200
            log.wait_for(1)
            _settle(registry)
            after = _counters(registry)
            views = Views(port)
    finally:
        app.close()  # an app that ignores the lifespan: its side port stays until closed
    seen = loop_impl == "asyncio" or EXACT
    owner = ("GET", "<unmatched>")
    _check_one_owner(owner, log, log_lines, before, after, views, otel, loop_time=seen)


def _busy(registry: CollectorRegistry) -> Callable[[str], float]:
    counters = _counters(registry).get("loopwatch_event_loop_busy_seconds_total", {})
    return lambda route: sum(v for (_, r), v in counters.items() if r == route)


def test_an_idle_server_books_no_background_time(
    loop_impl: str, registry: CollectorRegistry
) -> None:
    """loopwatch's heartbeat (100 wake-ups a second) and uvicorn's main-loop tick are not the
    app's: an app whose code never runs books no ``<background>`` loop time."""
    app = fastapi_app(registry, StallLog())
    with serve(app, loop=loop_impl) as url:
        assert httpx.get(url + "/ok", timeout=10).status_code == 200
        _settle(registry)
        start = _busy(registry)("<background>")
        time.sleep(4)
        grown = _busy(registry)("<background>") - start
    # before: the heartbeat alone booked about 6 ms per second here; what is left is the
    # loop's timer callback that wakes the server's own sleep (a few microseconds each)
    assert grown < 0.002, grown


def test_the_first_request_imports_nothing_on_the_loop(tmp_path: Any) -> None:
    """anyio's asyncio backend (the threadpool's limiter) is imported by the watchdog at
    start-up, never by the first request on the loop (45-55 ms on anyio 3)."""
    import subprocess
    import textwrap

    script = tmp_path / "first.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, sys, threading
            import anyio  # loaded, as Starlette loads it; its asyncio backend not yet
            assert "anyio._backends._asyncio" not in sys.modules
            from loopwatch import LoopWatchMiddleware

            where = {}

            class Spy:
                def find_spec(self, name, path=None, target=None):
                    if name == "anyio._backends._asyncio":
                        where["thread"] = threading.current_thread().name
                    return None

            sys.meta_path.insert(0, Spy())

            async def plain(scope, receive, send):
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"ok"})

            app = LoopWatchMiddleware(plain)

            async def main():
                sent = []
                async def receive():
                    return {"type": "http.request", "body": b""}
                async def send(message):
                    sent.append(message)
                scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
                await app(scope, receive, send)
                await asyncio.sleep(0.5)  # the heartbeat's first beats
                app.close()
                print(where.get("thread"))

            asyncio.run(main())
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    thread = out.stdout.split()[0]
    assert thread == "loopwatch-watchdog", out.stdout + out.stderr
