"""The middleware's contract: counts, labels, exceptions, disconnects, lifecycle, exposition."""

from __future__ import annotations

import asyncio
import gzip
import logging
import pathlib
import random
import re
import socket
import string
import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.responses import StreamingResponse
from starlette.testclient import TestClient

from loopwatch import UNMATCHED, LoopWatchMiddleware, metrics_app
from tests.helpers import StallLog, eventually, sample, series
from tests.serving import free_port, serve, serve_process, server_output


def small_app(registry: CollectorRegistry, **options: object) -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/block")
    async def block() -> dict[str, str]:
        time.sleep(1.5)
        return {}

    @app.post("/only-post")
    async def only_post() -> dict[str, str]:
        return {}

    @app.get("/boom")
    async def boom() -> None:
        raise KeyError("the app's own error")

    @app.get("/slow-body")
    async def slow_body() -> object:
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(50):
                yield b"x" * 1024
                await asyncio.sleep(0.02)

        return StreamingResponse(chunks())

    app.add_middleware(LoopWatchMiddleware, registry=registry, **options)  # type: ignore[arg-type]
    app.mount("/metrics", metrics_app(registry))
    return app


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"]


def test_side_port_answers_during_a_stall_and_shows_it_growing(
    loop_impl: str, registry: CollectorRegistry
) -> None:
    port = free_port()
    app = small_app(registry, metrics_port=port)
    with serve(app, loop=loop_impl) as url:
        blocker = threading.Thread(target=httpx.get, args=(f"{url}/block",), kwargs={"timeout": 10})
        blocker.start()
        readings: list[float] = []
        while blocker.is_alive():  # the 1.5 s stall is in progress
            r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
            assert r.status_code == 200
            for line in r.text.splitlines():
                if line.startswith("loopwatch_current_stall_seconds "):
                    readings.append(float(line.split()[1]))
            time.sleep(0.1)
        blocker.join()
    during = [x for x in readings if x > 0]
    assert len(during) >= 3, readings  # answered, and saw the stall, while the loop was frozen
    assert during == sorted(during) and during[-1] - during[0] > 0.2  # kept growing
    assert max(during) < 2.0


def test_random_404_paths_leave_one_unmatched_series(registry: CollectorRegistry) -> None:
    app = small_app(registry)
    rng = random.Random(7)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(500):
            path = "/" + "".join(rng.choices(string.ascii_letters + "/", k=rng.randint(1, 40)))
            query = "?token=" + "".join(rng.choices(string.ascii_letters, k=20))
            assert client.get(path + query).status_code == 404
        # 405 and the trailing-slash redirect are unmatched too
        assert client.get("/only-post").status_code == 405
        assert client.get("/ok/", follow_redirects=False).status_code == 307
    routes = {s["route"] for s in series(registry, "loopwatch_requests_total")}
    assert routes == {UNMATCHED}
    assert (
        sample(registry, "loopwatch_requests_total", method="GET", route=UNMATCHED, status="404")
        == 500
    )
    assert (
        sample(registry, "loopwatch_requests_total", method="GET", route=UNMATCHED, status="405")
        == 1
    )
    assert (
        sample(registry, "loopwatch_requests_total", method="GET", route=UNMATCHED, status="307")
        == 1
    )


def test_odd_methods_and_long_paths_are_bounded(registry: CollectorRegistry) -> None:
    app = small_app(registry)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for method in ("BREW", "PROPFIND", "get"):
            client.request(method, "/ok")
        client.get("/" + "a" * 60_000)
    labels = series(registry, "loopwatch_requests_total")
    assert {lab["method"] for lab in labels} <= {"OTHER", "GET"}
    assert all(len(lab["route"]) < 100 for lab in labels)


def test_exceptions_propagate_unchanged_and_count_as_500(registry: CollectorRegistry) -> None:
    app = small_app(registry)
    with (
        TestClient(app, raise_server_exceptions=True) as client,
        pytest.raises(KeyError, match="the app's own error"),
    ):
        client.get("/boom")
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/boom").status_code == 500
    assert (
        sample(registry, "loopwatch_requests_total", method="GET", route="/boom", status="500") == 2
    )
    assert sample(registry, "loopwatch_requests_in_flight") == 0


def test_client_disconnects_leave_nothing_in_flight(
    loop_impl: str, registry: CollectorRegistry
) -> None:
    app = small_app(registry)
    with serve(app, loop=loop_impl) as url:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET /slow-body HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(2048)  # the response has started; hang up mid-body
        with httpx.Client(base_url=url) as client:
            for _ in range(5):
                assert client.get("/ok").status_code == 200
        eventually(lambda: sample(registry, "loopwatch_requests_in_flight") == 0, timeout=5)
        total = sum(
            sample(registry, "loopwatch_requests_total", method="GET", route="/slow-body", status=s)
            for s in ("200", "500")
        )
        assert total == 10  # every request counted once, aborted or not
    assert (
        sample(registry, "loopwatch_requests_total", method="GET", route="/ok", status="200") == 5
    )


def test_no_watchdog_thread_after_shutdown(loop_impl: str, registry: CollectorRegistry) -> None:
    before = len(watchdogs())
    app = small_app(registry, metrics_port=0)
    with serve(app, loop=loop_impl) as url:
        assert httpx.get(f"{url}/ok").status_code == 200
        assert len(watchdogs()) == before + 1
    eventually(lambda: len(watchdogs()) == before, timeout=2, what="watchdog gone")
    # stopped off the loop, by a thread of its own: gone promptly, not necessarily at once
    eventually(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("loopwatch-metrics")],
        timeout=2, what="side-port threads gone",
    )  # fmt: skip


def test_lifespan_off_starts_at_first_request(registry: CollectorRegistry) -> None:
    log = StallLog()
    app = small_app(registry, on_stall=log)
    with serve(app, lifespan="off") as url:
        assert httpx.get(f"{url}/ok").status_code == 200
        assert len(watchdogs()) >= 1
        assert httpx.get(f"{url}/block", timeout=10).status_code == 200
        [stall] = log.wait_for(1)
    assert stall.route == "/block"
    eventually(lambda: not watchdogs(), timeout=3, what="watchdog gone with its loop")


def test_metrics_endpoint_answers_200_and_is_not_counted(registry: CollectorRegistry) -> None:
    app = small_app(registry)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        client.get("/ok")
        plain = client.get("/metrics", follow_redirects=False)
        assert plain.status_code == 200
        assert plain.headers["content-type"].startswith("text/plain")
        assert 'loopwatch_requests_total{method="GET",route="/ok",status="200"} 1.0' in plain.text
        om = client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
        with client.stream("GET", "/metrics/", headers={"Accept-Encoding": "gzip"}) as raw:
            assert raw.headers["content-encoding"] == "gzip"
            body = gzip.decompress(b"".join(raw.iter_raw()))
        assert b"loopwatch_event_loop_lag_seconds_bucket" in body
        assert client.get("/metrics/stalls").json() == []
    routes = {s["route"] for s in series(registry, "loopwatch_requests_total")}
    assert routes == {"/ok"}


def test_metrics_rendering_does_not_block_the_loop(registry: CollectorRegistry) -> None:
    log = StallLog()
    app = small_app(registry, on_stall=log)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(20):
            client.get("/ok")
            client.get("/metrics")
    time.sleep(0.2)
    assert log.stalls == []


def test_request_metrics_off_keeps_stalls_only(registry: CollectorRegistry) -> None:
    log = StallLog()
    app = small_app(registry, request_metrics=False, on_stall=log)
    with serve(app) as url:
        httpx.get(f"{url}/block", timeout=10)
        log.wait_for(1)
        text = httpx.get(f"{url}/metrics").text
    assert "loopwatch_stall_duration_seconds_count" in text
    assert "loopwatch_requests_total" not in text
    assert "loopwatch_request_duration_seconds" not in text
    assert "loopwatch_requests_in_flight" not in text


def test_excluded_paths_are_not_counted(registry: CollectorRegistry) -> None:
    app = small_app(registry, exclude=["/ok"])
    with TestClient(app) as client:
        client.get("/ok")
        client.post("/only-post")
    routes = {s["route"] for s in series(registry, "loopwatch_requests_total")}
    assert routes == {"/only-post"}


def test_a_long_stall_is_logged_while_it_lasts(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    app = small_app(registry, long_stall=0.5)
    with caplog.at_level(logging.WARNING, logger="loopwatch"), serve(app) as url:
        blocker = threading.Thread(target=httpx.get, args=(f"{url}/block",), kwargs={"timeout": 10})
        blocker.start()
        seen_during: list[str] = []
        while blocker.is_alive() and not seen_during:
            seen_during = [
                r.getMessage() for r in caplog.records if "still blocked" in r.getMessage()
            ]
            time.sleep(0.02)
        blocker.join()
        eventually(lambda: any("blocked for 1." in r.getMessage() for r in caplog.records))
    assert seen_during, "the stall was not logged before it ended"
    assert "GET /block" in seen_during[0] and "in block" in seen_during[0]
    final = [r.getMessage() for r in caplog.records if "still blocked" not in r.getMessage()]
    assert any(
        m.startswith("event loop blocked for 1.") and "GET /block (wait)" in m for m in final
    )


def test_two_apps_on_one_loop_share_one_monitor_and_registry() -> None:
    outer_registry = CollectorRegistry()
    inner = small_app(outer_registry)
    outer = small_app(outer_registry)
    outer.mount("/inner", inner)
    with TestClient(outer) as client:
        client.get("/ok")
        client.get("/inner/ok")
        assert len(watchdogs()) == 1
    assert (
        sample(outer_registry, "loopwatch_requests_total", method="GET", route="/ok", status="200")
        == 1
    )
    # counted once, by the outermost middleware, with the full template
    assert (
        sample(
            outer_registry,
            "loopwatch_requests_total",
            method="GET",
            route="/inner/ok",
            status="200",
        )
        == 1
    )
    assert (
        sample(outer_registry, "loopwatch_requests_total", method="GET", route="/ok", status="200")
        == 1
    )


def test_app_rebuilt_per_test_reuses_metrics_in_the_default_registry() -> None:
    for _ in range(3):
        app = FastAPI()
        app.add_middleware(LoopWatchMiddleware)
        app.mount("/metrics", metrics_app())
        with TestClient(app) as client:
            assert client.get("/metrics").status_code == 200


def test_threadpool_gauges_show_a_saturated_pool(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/sync-work")
    def sync_work() -> dict[str, str]:
        time.sleep(1.5)  # a def endpoint: holds a threadpool thread
        return {}

    app.add_middleware(LoopWatchMiddleware, registry=registry)
    app.mount("/metrics", metrics_app(registry))
    with serve(app) as url:

        async def saturate() -> tuple[str, list[int]]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
                work = [asyncio.create_task(client.get("/sync-work")) for _ in range(55)]
                await asyncio.sleep(0.8)
                text = (await client.get("/metrics")).text
                return text, [r.status_code for r in await asyncio.gather(*work)]

        text, statuses = asyncio.run(saturate())
        assert statuses == [200] * 55
        values = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("loopwatch_threadpool_")
        }
        assert values["loopwatch_threadpool_size"] == 40
        assert values["loopwatch_threadpool_busy_threads"] == 40
        assert values["loopwatch_threadpool_waiting_tasks"] >= 10  # def endpoints queueing
        eventually(lambda: sample(registry, "loopwatch_threadpool_busy_threads") == 0, timeout=5)


def test_request_metrics_off_books_a_stall_before_routing_under_routing(
    registry: CollectorRegistry,
) -> None:
    from starlette.requests import Request

    log = StallLog()
    app = FastAPI()

    @app.middleware("http")
    async def slow_auth(request: Request, call_next: object) -> object:
        time.sleep(0.4)  # before routing: <routing>'s, with or without request metrics
        return await call_next(request)  # type: ignore[operator]

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        return {"order_id": order_id}

    app.add_middleware(LoopWatchMiddleware, registry=registry, on_stall=log, request_metrics=False)
    with serve(app) as url:
        assert httpx.get(f"{url}/orders/3", timeout=10).status_code == 200
        [stall] = log.wait_for(1)
    assert (stall.method, stall.route) == ("GET", "<routing>")
    count = "loopwatch_stall_duration_seconds_count"
    assert sample(registry, count, method="GET", route="<routing>", kind="wait") == 1
    assert sample(registry, "loopwatch_stalls_total", method="GET", route="<routing>") == 1


def test_a_stall_right_before_the_loop_closes_is_still_reported(
    registry: CollectorRegistry,
) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    async def block(request: Request) -> PlainTextResponse:
        time.sleep(0.4)
        return PlainTextResponse("x")

    log = StallLog()
    inner = Starlette(routes=[Route("/block", block), Mount("/metrics", metrics_app(registry))])
    # wrapped directly, not with add_middleware: scope["app"] is not set at this layer
    app = LoopWatchMiddleware(inner, registry=registry, on_stall=log)

    async def one_request_then_shutdown() -> int:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/block")
            return (await client.get("/metrics", follow_redirects=False)).status_code

    for _ in range(3):  # asyncio.run closes the loop the moment the request is done
        assert asyncio.run(one_request_then_shutdown()) == 200
    log.wait_for(3)
    assert log.routes() == ["/block"] * 3


def test_side_port_survives_an_app_that_ignores_lifespan(registry: CollectorRegistry) -> None:
    async def plain_app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return  # very common: no lifespan support at all
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    app = LoopWatchMiddleware(plain_app, registry=registry, metrics_port=0)  # type: ignore[arg-type]
    assert app.metrics_server is not None
    port = app.metrics_server.port
    with serve(app, lifespan="auto") as url:
        assert httpx.get(f"{url}/x").text == "ok"
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    app.close()


def test_exclude_is_relative_to_root_path(registry: CollectorRegistry) -> None:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {}

    @app.get("/work")
    async def work() -> dict[str, str]:
        return {}

    app.add_middleware(LoopWatchMiddleware, registry=registry, exclude=["/health"])
    with serve(app, root_path="/api") as url:  # behind a proxy that strips /api
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/work").status_code == 200
    assert {s["route"] for s in series(registry, "loopwatch_requests_total")} == {"/work"}


def test_lifespan_cycles_do_not_grow_the_aggregates(registry: CollectorRegistry) -> None:
    from loopwatch.metrics import book_for

    app = small_app(registry)
    for _ in range(10):
        with TestClient(app) as client:
            client.get("/ok")
    assert len(book_for(registry).shards) <= 2  # folded into one kept shard
    assert (
        sample(registry, "loopwatch_requests_total", method="GET", route="/ok", status="200") == 10
    )


def test_a_finished_request_does_not_own_its_task_afterwards(registry: CollectorRegistry) -> None:
    # ASGITransport runs the app in the caller's task; blocking there after the request is
    # that task's own code, on every Python (3.10/3.11 keep task owners in a table)
    log = StallLog()
    app = small_app(registry, on_stall=log)

    async def request_then_block() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/ok")
            time.sleep(0.3)  # no request in flight now
            await client.get("/ok")

    asyncio.run(request_then_block())
    [stall] = log.wait_for(1)
    assert (stall.method, stall.route) == (
        "-", "<task test_a_finished_request_does_not_own_its_task_afterwards.request_then_block>"
    )  # fmt: skip


def test_stalls_before_routing_are_reported_when_the_response_starts(
    registry: CollectorRegistry,
) -> None:
    from starlette.requests import Request

    log = StallLog()
    app = FastAPI()

    @app.middleware("http")
    async def slow_auth(request: Request, call_next: object) -> object:
        time.sleep(0.4)  # before routing
        return await call_next(request)  # type: ignore[operator]

    @app.get("/events/{topic}", response_model=None)
    async def events(topic: str) -> StreamingResponse:
        async def stream():  # type: ignore[no-untyped-def]
            for _ in range(40):
                yield b"tick\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(stream())

    app.add_middleware(LoopWatchMiddleware, registry=registry, on_stall=log)
    with serve(app) as url, httpx.stream("GET", f"{url}/events/news", timeout=10) as response:
        next(response.iter_bytes())
        # the stream runs 2 s more; the stall is known long before it ends, under the
        # owner it was booked for while it lasted (one owner per hold)
        [stall] = log.wait_for(1, timeout=1.5)
        assert stall.route == "<routing>"


def shutdown_blocking_app(registry: CollectorRegistry, log: StallLog) -> object:
    import contextlib
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        time.sleep(0.4)  # flushing a cache to disk, say

    async def block(request: Request) -> PlainTextResponse:
        time.sleep(0.4)
        return PlainTextResponse("x")

    app = Starlette(routes=[Route("/block", block)], lifespan=lifespan)
    app.add_middleware(LoopWatchMiddleware, registry=registry, on_stall=log)  # type: ignore[arg-type]
    return app


def test_a_stall_in_a_lifespan_shutdown_handler_is_reported(
    loop_impl: str, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    log = StallLog()
    with (
        caplog.at_level(logging.WARNING, logger="loopwatch"),
        serve(shutdown_blocking_app(registry, log), loop=loop_impl),
    ):
        pass
    [stall] = log.stalls  # delivered by the time the server has stopped
    assert stall.route == "<background>" and 0.34 <= stall.duration <= 0.55
    assert "in lifespan" in stall.culprit
    assert [r for r in caplog.records if "event loop blocked for" in r.getMessage()]
    stalls = sample(
        registry, "loopwatch_stall_duration_seconds_count", method="-", route="<background>",
        kind="wait",
    )  # fmt: skip
    assert stalls == 1


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_a_stall_right_before_testclient_exits_is_reported_every_time(
    use_uvloop: bool, registry: CollectorRegistry
) -> None:
    log = StallLog()
    app = shutdown_blocking_app(registry, log)
    for run in range(1, 6):
        with TestClient(app, backend_options={"use_uvloop": use_uvloop}) as client:  # type: ignore[arg-type]
            assert client.get("/block").text == "x"
        # the request's stall and the shutdown handler's, each run
        assert sorted(log.routes()) == sorted(["/block", "<background>"] * run)
    stalls = sample(
        registry, "loopwatch_stall_duration_seconds_count", method="GET", route="/block",
        kind="wait",
    )  # fmt: skip
    assert stalls == 5


def test_latency_and_in_flight_end_at_the_last_body_chunk_not_after_background_tasks(
    loop_impl: str, registry: CollectorRegistry
) -> None:
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    log = StallLog()
    background_done = threading.Event()

    async def send_email() -> None:
        await asyncio.sleep(1.0)
        time.sleep(0.3)  # still the request's, for stalls
        background_done.set()

    async def signup(request: Request) -> PlainTextResponse:
        return PlainTextResponse("welcome", background=BackgroundTask(send_email))

    app = Starlette(routes=[Route("/signup", signup)])
    app.add_middleware(LoopWatchMiddleware, registry=registry, on_stall=log)  # type: ignore[arg-type]
    with serve(app, loop=loop_impl) as url:
        started = time.perf_counter()
        assert httpx.get(f"{url}/signup").text == "welcome"
        client_saw = time.perf_counter() - started
        # the background task is still awaiting: the request is answered, not in flight
        assert not background_done.is_set()
        eventually(lambda: sample(registry, "loopwatch_requests_in_flight") == 0, timeout=0.5)
        labels = {"method": "GET", "route": "/signup"}
        assert sample(registry, "loopwatch_request_duration_seconds_count", **labels) == 1
        recorded = sample(registry, "loopwatch_request_duration_seconds_sum", **labels)
        assert recorded < min(0.5, client_saw + 0.05)
        assert background_done.wait(5)
        [stall] = log.wait_for(1)
    assert (stall.method, stall.route) == ("GET", "/signup") and "in send_email" in stall.culprit
    # counted once, at the answer: the background task's end adds nothing
    assert sample(registry, "loopwatch_request_duration_seconds_count", **labels) == 1
    assert sample(registry, "loopwatch_requests_total", status="200", **labels) == 1


def test_every_request_is_counted_once_however_it_ends(registry: CollectorRegistry) -> None:
    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        path = scope.get("path")
        if scope["type"] == "websocket":
            await receive()  # type: ignore[operator]
            await send({"type": "websocket.accept"})  # type: ignore[operator]
            await send({"type": "websocket.close", "code": 1000})  # type: ignore[operator]
            return
        if scope["type"] != "http":
            return
        if path == "/no-final-body":  # starts, sends a chunk, then returns
            await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": b"a", "more_body": True})  # type: ignore[operator]
            return
        if path == "/raise-after-body":
            await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": b"done"})  # type: ignore[operator]
            raise RuntimeError("a background task failed")
        if path == "/raise":
            raise RuntimeError("the app's own error")
        await send({"type": "http.response.start", "status": 201, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"x", "more_body": True})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"y"})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"", "more_body": False})  # type: ignore[operator]

    wrapped = LoopWatchMiddleware(app, registry=registry)  # type: ignore[arg-type]
    client = TestClient(wrapped, raise_server_exceptions=False)  # type: ignore[arg-type]
    assert client.get("/chunks").text == "xy"
    client.get("/no-final-body")
    client.get("/raise-after-body")
    assert client.get("/raise").status_code == 500
    with client.websocket_connect("/ws"):
        pass

    def count(status: str) -> float:
        return sum(
            sample(registry, "loopwatch_requests_total", method=m, route=UNMATCHED, status=status)
            for m in ("GET", "WS")
        )

    assert [count(s) for s in ("201", "200", "500", "101")] == [1, 2, 1, 1]
    assert sample(registry, "loopwatch_request_duration_seconds_count", method="GET",
                  route=UNMATCHED) == 4  # fmt: skip
    assert sample(registry, "loopwatch_requests_in_flight") == 0


def test_head_answers_every_exposition_path_without_a_body(registry: CollectorRegistry) -> None:
    port = free_port()
    app = small_app(registry, metrics_port=port)
    with serve(app) as url:
        for base, paths in (
            (f"{url}/metrics", ("", "/stalls", "/profile")),
            (f"http://127.0.0.1:{port}", ("/metrics", "/stalls", "/profile")),
        ):
            for path in paths:
                get = httpx.get(base + path, timeout=5)
                head = httpx.head(base + path, timeout=5)
                assert (get.status_code, head.status_code) == (200, 200), base + path
                assert head.content == b"", base + path
                head_length = int(head.headers["content-length"])
                get_length = int(get.headers["content-length"])
                if path in ("", "/metrics", "/profile"):
                    # the exposition and the sampled profile change between two requests
                    # (each request is loop time, and may be sampled): the same size, roughly
                    assert 0.75 * get_length <= head_length <= 1.25 * get_length, base + path
                else:
                    assert head_length == get_length, base + path
        # on the wire: nothing after the side port's headers (httpx drops a HEAD body itself)
        for path in ("/metrics", "/stalls", "/profile"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(f"HEAD {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
            assert raw.startswith(b"HTTP/1.0 200") and raw.endswith(b"\r\n\r\n"), (path, raw[-80:])
        assert httpx.get(f"{url}/ok", timeout=5).status_code == 200  # the server is fine


SIDE_PORT_APP = """
import logging

from fastapi import FastAPI

from loopwatch import LoopWatchMiddleware

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
app = FastAPI()
app.add_middleware(LoopWatchMiddleware)
"""


def test_a_side_port_on_port_0_logs_the_port_it_got_and_state_json_names_it(
    tmp_path: pathlib.Path, loop_impl: str
) -> None:
    (tmp_path / "side_port_app.py").write_text(SIDE_PORT_APP)
    with serve_process(
        "side_port_app:app",
        args=("--app-dir", str(tmp_path), "--loop", loop_impl),
        env={"LOOPWATCH_METRICS_PORT": "0"},
    ) as (url, proc):
        output = server_output(proc)
        found = re.findall(
            r"INFO loopwatch loopwatch: side port .* at http://127\.0\.0\.1:(\d+)/", output
        )
        assert len(found) == 1, output  # once, when it is bound
        port = int(found[0])
        assert port != 0 and f"127.0.0.1:{port}" not in url
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and '<script src="ui/app.js"' in page.text
        state = httpx.get(f"http://127.0.0.1:{port}/ui/state.json", timeout=10).json()
        assert state["side_port"] == port
        assert "loopwatch_stall_seconds_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
