"""OpenTelemetry: stall spans in the culprit's trace, victims' events, metrics on a
MeterProvider, exemplars and log fields. The real SDK with its in-memory exporter and reader,
the real FastAPI instrumentation wrapping the app, a real uvicorn on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from loopwatch import ConfigError, LoopWatchMiddleware, Monitor, Stall
from loopwatch.requests import HAS_TASK_CONTEXT
from tests.helpers import StallLog, eventually, sample
from tests.otel_sdk import Otel
from tests.serving import serve, serve_process

BLOCK = 0.45  # seconds the blocker holds the loop; threshold 0.25
THRESHOLD = 0.25


def build_app(
    sdk: Otel | None,
    registry: CollectorRegistry,
    log: StallLog,
    inner: Callable[[FastAPI], None] | None = None,
    **options: Any,
) -> Any:
    """The test app; ``inner`` adds what must run inside loopwatch's middleware."""
    app = FastAPI()
    tracer = (sdk.tracer_provider if sdk else trace.NoOpTracerProvider()).get_tracer("app")

    @app.get("/block")
    async def block() -> dict[str, str]:
        with tracer.start_as_current_span("handler.work"):  # the active span on 3.12+
            time.sleep(BLOCK)
        return {"ok": "block"}

    @app.get("/wait")
    async def wait() -> dict[str, str]:
        await asyncio.sleep(0.1)  # done long before the blocker lets go: it waits for the loop
        return {"ok": "wait"}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {"ok": "fast"}

    @app.get("/pool")
    def pool() -> dict[str, str]:
        return {"ok": "pool"}

    if inner is not None:
        inner(app)
    if sdk is not None:
        options.setdefault("tracer_provider", sdk.tracer_provider)
        options.setdefault("meter_provider", sdk.meter_provider)
    app.add_middleware(
        LoopWatchMiddleware, threshold=THRESHOLD, registry=registry, on_stall=log, **options
    )
    if sdk is not None:
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=sdk.tracer_provider, meter_provider=sdk.meter_provider
        )
    return app


def blocker_with_victim(url: str, registry: CollectorRegistry) -> None:
    """GET /wait in flight, then GET /block holds the loop; then an innocent GET /fast."""
    with httpx.Client(timeout=10) as client:
        client.get(f"{url}/fast")  # warm: the monitor runs, routes known
        results: list[int] = []
        victim = threading.Thread(
            target=lambda: results.append(client.get(f"{url}/wait").status_code)
        )
        victim.start()
        # the victim inside the app before the blocker holds the loop (a fixed pause lost
        # that race on a loaded machine)
        eventually(
            lambda: sample(registry, "loopwatch_requests_in_flight") >= 1, what="/wait in flight"
        )
        assert client.get(f"{url}/block").status_code == 200
        victim.join(10)
        assert results == [200]
        assert client.get(f"{url}/fast").status_code == 200


def settle() -> None:
    for monitor in list(Monitor._by_loop.values()):
        monitor.settle(2.0)


def traced_stall(otel: Otel, registry: CollectorRegistry, loop_impl: str) -> tuple[Stall, Any]:
    """A blocker and a victim on a traced app: the stall and its one span."""
    log = StallLog()
    with serve(build_app(otel, registry, log), loop=loop_impl) as url:
        blocker_with_victim(url, registry)
        (stall,) = log.wait_for(1)
        eventually(lambda: len(otel.named("loopwatch.stall")) == 1, what="the stall span")
    (span,) = otel.named("loopwatch.stall")
    return stall, span


def test_stall_span_is_a_child_of_the_culprit_span_with_its_timing_and_attributes(
    otel: Otel, registry: CollectorRegistry, loop_impl: str
) -> None:
    stall, span = traced_stall(otel, registry, loop_impl)
    server = otel.server_span("/block")
    (work,) = otel.named("handler.work")
    # the span active in the request when loopwatch saw it: the handler's own on 3.12+
    # (read from the blocking task), the request's server span on 3.10/3.11 (captured as the
    # request entered the middleware)
    parent = work if HAS_TASK_CONTEXT else server
    assert span.parent is not None and span.context is not None
    assert span.context.trace_id == server.context.trace_id  # type: ignore[union-attr]
    assert span.parent.span_id == parent.context.span_id  # type: ignore[union-attr]
    assert span.kind == trace.SpanKind.INTERNAL
    # the stall's own start and end
    assert span.start_time == int(stall.started_at * 1e9)
    assert span.end_time is not None and span.start_time is not None
    assert abs((span.end_time - span.start_time) / 1e9 - stall.duration) < 1e-6
    assert BLOCK * 0.8 < stall.duration < BLOCK * 2
    assert server.start_time is not None and server.end_time is not None
    assert server.start_time - 0.05e9 <= span.start_time  # from the heartbeat before it
    # it ends when the heartbeat runs again: the request may answer just before that
    assert span.end_time <= server.end_time + 0.03e9
    a = dict(span.attributes or {})
    assert a["http.route"] == "/block" and a["http.request.method"] == "GET"
    assert a["code.function.name"] == "block"
    assert a["code.file.path"] == __file__
    assert isinstance(a["code.line.number"], int)
    assert f"{a['code.file.path']}:{a['code.line.number']} in block" == stall.culprit
    assert "time.sleep(BLOCK)" in str(a["code.stacktrace"])
    assert a["loopwatch.stall.kind"] == stall.kind == "wait"
    assert a["loopwatch.stall.duration"] == stall.duration
    assert a["loopwatch.requests_in_flight"] == stall.requests_in_flight >= 2
    # the Stall carries the culprit's ids (sampled), for callbacks, logs and exemplars
    assert stall.trace_id == trace.format_trace_id(server.context.trace_id)  # type: ignore[union-attr]
    assert stall.span_id == trace.format_span_id(parent.context.span_id)  # type: ignore[union-attr]


def test_victims_get_an_event_and_innocent_traces_no_stall_span(
    otel: Otel, registry: CollectorRegistry, loop_impl: str
) -> None:
    stall, stall_span = traced_stall(otel, registry, loop_impl)
    victim = otel.server_span("/wait")
    (event,) = [e for e in victim.events if e.name == "loopwatch.blocked"]
    a = dict(event.attributes or {})
    assert a["loopwatch.stall.http.route"] == "/block"
    assert a["loopwatch.stall.http.request.method"] == "GET"
    assert a["loopwatch.stall.culprit"] == stall.culprit
    # measured as the loop let go; the delivered figure comes one watchdog check later
    assert abs(float(a["loopwatch.stall.duration"]) - stall.duration) < 0.05  # type: ignore[arg-type]
    assert a["loopwatch.stall.trace_id"] == stall.trace_id
    assert abs(event.timestamp - int(stall.started_at * 1e9)) < 0.02e9
    # the culprit's own spans get no event; no other trace holds a stall span
    blocker = otel.server_span("/block")
    assert not [e for e in blocker.events if e.name == "loopwatch.blocked"]
    stall_trace = stall_span.context.trace_id  # type: ignore[union-attr]
    assert stall_trace == blocker.context.trace_id  # type: ignore[union-attr]
    innocent = [
        s for s in otel.spans() if (s.attributes or {}).get("http.route") in ("/fast", "/wait")
    ]
    assert len({s.context.trace_id for s in innocent}) >= 3  # type: ignore[union-attr]
    assert stall_trace not in {s.context.trace_id for s in innocent}  # type: ignore[union-attr]


def test_a_stall_barely_over_the_threshold_tells_its_victims_and_no_later_request(
    otel: Otel, registry: CollectorRegistry, loop_impl: str
) -> None:
    """A hold that ends just past the threshold is seldom seen live at that age: the stall
    is confirmed only when the watchdog closes it. Its victims are still told; a request
    that arrives after it (still in flight at the close) is not."""
    log = StallLog()
    rounds = 5

    def inner(app: FastAPI) -> None:
        @app.get("/barely")
        async def barely() -> dict[str, str]:
            # Held from just after a heartbeat to 15 ms past the threshold: the watchdog's
            # checks (every 50 ms) see that age while it lasts about a quarter of the time.
            monitor = Monitor.current()
            assert monitor is not None
            while time.monotonic() - monitor.last_beat > 0.005:
                await asyncio.sleep(0.001)
            time.sleep(monitor.last_beat + THRESHOLD + 0.015 - time.monotonic())
            return {"ok": "barely"}

        @app.get("/victim")
        @app.get("/late")
        async def linger() -> dict[str, str]:
            await asyncio.sleep(1.0)  # in flight well past the watchdog's close
            return {"ok": "linger"}

    def get(client: httpx.Client, url: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: client.get(url).raise_for_status())
        thread.start()
        return thread

    def in_flight() -> float:
        return sample(registry, "loopwatch_requests_in_flight")

    app = build_app(otel, registry, log, inner, interval=0.05)
    with serve(app, loop=loop_impl) as url, httpx.Client(timeout=10) as client:
        client.get(f"{url}/fast")  # warm: the monitor runs
        for _ in range(rounds):
            victim = get(client, f"{url}/victim")
            eventually(lambda: in_flight() == 1, what="the victim in flight")
            assert client.get(f"{url}/barely").status_code == 200
            late = get(client, f"{url}/late")  # before the watchdog's next check
            victim.join(10)
            late.join(10)
            time.sleep(0.1)
        stalls = log.wait_for(rounds)
        settle()
    assert [s.route for s in stalls] == ["/barely"] * rounds
    assert all(THRESHOLD <= s.duration < THRESHOLD + 0.1 for s in stalls)

    def told(route: str) -> list[int]:
        spans = [
            s for s in otel.spans()
            if s.kind == trace.SpanKind.SERVER and (s.attributes or {}).get("http.route") == route
        ]  # fmt: skip
        assert len(spans) == rounds
        return [len([e for e in s.events if e.name == "loopwatch.blocked"]) for s in spans]

    assert told("/victim") == [1] * rounds
    assert told("/late") == [0] * rounds


def test_background_stall_is_a_root_span(otel: Otel, registry: CollectorRegistry) -> None:
    log = StallLog()
    app = build_app(otel, registry, log)

    @app.get("/later")
    async def later() -> dict[str, str]:
        # scheduled outside any request's context (a callback a request schedules is its)
        loop = asyncio.get_running_loop()
        contextvars.Context().run(loop.call_later, 0.05, time.sleep, BLOCK)
        return {"ok": "later"}

    with serve(app) as url:
        assert httpx.get(f"{url}/later", timeout=10).status_code == 200
        (stall,) = log.wait_for(1)
        eventually(lambda: len(otel.named("loopwatch.stall")) == 1, what="the stall span")
    (span,) = otel.named("loopwatch.stall")
    assert span.parent is None
    assert stall.route == "<background>" and stall.trace_id == ""
    assert (span.attributes or {})["http.route"] == "<background>"
    assert "http.request.method" not in (span.attributes or {})


def test_a_callback_a_request_scheduled_is_that_requests_span(
    otel: Otel, registry: CollectorRegistry
) -> None:
    """One owner per hold: the callback runs in the request's context (asyncio reads it from
    the callback's handle), so its stall's span is the request's route, in its trace."""
    log = StallLog()
    app = build_app(otel, registry, log)

    @app.get("/schedule")
    async def schedule() -> dict[str, str]:
        done = asyncio.get_running_loop().create_future()

        def blocker() -> None:
            time.sleep(BLOCK)
            done.set_result(None)

        asyncio.get_running_loop().call_later(0.01, blocker)
        await done
        return {"ok": "scheduled"}

    with serve(app) as url:
        assert httpx.get(f"{url}/schedule", timeout=10).status_code == 200
        (stall,) = log.wait_for(1)
        eventually(lambda: len(otel.named("loopwatch.stall")) == 1, what="the stall span")
    (span,) = otel.named("loopwatch.stall")
    assert (stall.method, stall.route) == ("GET", "/schedule")
    assert (span.attributes or {})["http.route"] == "/schedule"
    assert (span.attributes or {})["http.request.method"] == "GET"
    servers = [s for s in otel.spans() if s.kind == trace.SpanKind.SERVER]
    traces = {s.context.trace_id for s in servers}  # type: ignore[union-attr]
    assert span.parent is not None and span.context.trace_id in traces  # type: ignore[union-attr]
    assert stall.trace_id == f"{span.context.trace_id:032x}"  # type: ignore[union-attr]


def test_stall_before_routing_gets_its_span_once_routed(
    otel: Otel, registry: CollectorRegistry
) -> None:
    """A middleware inside loopwatch blocks before the router ran: the stall is ``<routing>``'s
    in its span too (one owner per hold), a child of the request's trace."""
    log = StallLog()

    def inner(app: FastAPI) -> None:
        @app.middleware("http")
        async def slow_auth(request: Any, call_next: Any) -> Any:
            if request.url.path == "/fast" and request.query_params.get("auth"):
                time.sleep(BLOCK)
            return await call_next(request)

    with serve(build_app(otel, registry, log, inner)) as url:
        httpx.get(f"{url}/fast", timeout=10)
        assert httpx.get(f"{url}/fast?auth=1", timeout=10).status_code == 200
        (stall,) = log.wait_for(1)
        eventually(lambda: len(otel.named("loopwatch.stall")) == 1, what="the stall span")
    (span,) = otel.named("loopwatch.stall")
    assert stall.route == "<routing>"
    assert (span.attributes or {})["http.route"] == "<routing>"
    traces = {s.context.trace_id for s in otel.spans() if s.kind == trace.SpanKind.SERVER}  # type: ignore[union-attr]
    assert span.context.trace_id in traces  # type: ignore[union-attr]
    assert span.parent is not None


def test_otel_metrics_equal_the_prometheus_figures(
    otel: Otel, registry: CollectorRegistry, loop_impl: str
) -> None:
    log = StallLog()
    with serve(build_app(otel, registry, log), loop=loop_impl) as url:
        blocker_with_victim(url, registry)
        httpx.get(f"{url}/pool", timeout=10)
        log.wait_for(1)
        settle()
        got = otel.metrics()
        prom = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
        }
    (stall,) = log.stalls
    key = {"method": "GET", "route": "/block", "kind": stall.kind}
    (point,) = got["loopwatch.stall.duration"]
    assert dict(point.attributes) == {
        "http.request.method": "GET", "http.route": "/block", "loopwatch.stall.kind": stall.kind,
    }  # fmt: skip
    assert point.count == sample(registry, "loopwatch_stall_duration_seconds_count", **key) == 1
    assert point.sum == pytest.approx(
        sample(registry, "loopwatch_stall_duration_seconds_sum", **key)
    )
    assert list(point.explicit_bounds) == [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    cumulative = [sum(point.bucket_counts[: i + 1]) for i in range(len(point.bucket_counts))]
    les = [*(str(b) for b in point.explicit_bounds), "+Inf"]
    assert cumulative == [
        prom[("loopwatch_stall_duration_seconds_bucket", tuple(sorted({**key, "le": le}.items())))]
        for le in les
    ]
    # busy time per route: the routes whose requests are over hold still
    busy = {
        (p.attributes.get("http.request.method"), p.attributes["http.route"]): p.value
        for p in got["loopwatch.event_loop.busy_time"]
    }
    for route in ("/block", "/wait", "/fast", "/pool"):
        assert busy[("GET", route)] == pytest.approx(
            sample(registry, "loopwatch_event_loop_busy_seconds_total", method="GET", route=route)
        ), route
    assert busy[("GET", "/block")] >= BLOCK * 0.8
    (in_flight,) = got["loopwatch.requests.in_flight"]
    assert in_flight.value == sample(registry, "loopwatch_requests_in_flight") == 0
    for name in ("size", "busy_threads", "waiting_tasks"):
        (gauge,) = got[f"loopwatch.threadpool.{name}"]
        assert gauge.value == sample(registry, f"loopwatch_threadpool_{name}"), name
    (lag,) = got["loopwatch.event_loop.lag"]
    prom_lag = sample(registry, "loopwatch_event_loop_lag_seconds_count")
    # the heartbeats from start-up to the app's start-up complete predate OpenTelemetry
    assert 0 < lag.count <= prom_lag
    over = sample(registry, "loopwatch_event_loop_lag_seconds_bucket", le="+Inf") - sample(
        registry, "loopwatch_event_loop_lag_seconds_bucket", le="0.25"
    )
    assert sum(lag.bucket_counts[list(lag.explicit_bounds).index(0.25) + 1 :]) == over >= 1


def test_otel_in_flight_equals_prometheus_while_requests_are_in_flight(
    otel: Otel, registry: CollectorRegistry
) -> None:
    def hold_route(app: FastAPI) -> None:
        @app.get("/hold")
        async def hold() -> dict[str, str]:
            await asyncio.sleep(1.5)
            return {}

    log = StallLog()
    with serve(build_app(otel, registry, log, inner=hold_route)) as url:
        httpx.get(f"{url}/fast", timeout=10)  # the monitor runs
        holders = [
            threading.Thread(target=httpx.get, args=(f"{url}/hold",), kwargs={"timeout": 10})
            for _ in range(3)
        ]
        for holder in holders:
            holder.start()
        eventually(lambda: sample(registry, "loopwatch_requests_in_flight") == 3, what="3 held")
        (in_flight,) = otel.metrics()["loopwatch.requests.in_flight"]
        assert in_flight.value == sample(registry, "loopwatch_requests_in_flight") == 3
        for holder in holders:
            holder.join(10)
        eventually(lambda: sample(registry, "loopwatch_requests_in_flight") == 0, what="done")
        (in_flight,) = otel.metrics()["loopwatch.requests.in_flight"]
        assert in_flight.value == 0


def test_multiprocess_mode_serves_openmetrics_without_exemplars_and_loses_no_stall(
    tmp_path: Path,
) -> None:
    # prometheus_client's multiprocess files keep no exemplars: the traced stall is still
    # counted, OpenMetrics still renders, and nothing fails (the README says so)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "LOOPWATCH_THRESHOLD": "0.25"}
    with serve_process("tests.otel_demo_app:app", env=env) as (url, proc):
        assert httpx.get(f"{url}/async", timeout=10).status_code == 200  # 0.5 s on the loop
        headers = {"accept": "application/openmetrics-text; version=1.0.0"}

        def counted() -> bool:
            text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
            return (
                'loopwatch_stall_duration_seconds_count{kind="wait",method="GET",route="/async"} 1.0'
                in text
            )

        eventually(counted, what="the traced stall in the multiprocess files")
        response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
        output = Path(proc.output_path).read_text()  # type: ignore[attr-defined]
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert "trace_id" not in response.text and "# {" not in response.text
    assert "event loop blocked for" in output and "Traceback" not in output, output


def test_exemplars_carry_the_culprit_trace_in_openmetrics_only(
    otel: Otel, registry: CollectorRegistry
) -> None:
    log = StallLog()
    with serve(build_app(otel, registry, log)) as url:
        blocker_with_victim(url, registry)
        (stall,) = log.wait_for(1)
        text = openmetrics(registry).decode()
        plain = httpx.get(f"{url}/fast").text  # noqa: F841 - the app keeps serving
    line = next(
        ln for ln in text.splitlines()
        if ln.startswith("loopwatch_stall_duration_seconds_bucket") and "#" in ln
    )  # fmt: skip
    match = re.search(
        r'# \{span_id="([0-9a-f]{16})",trace_id="([0-9a-f]{32})"\} ([0-9.e-]+) ([0-9.]+)', line
    )
    assert match is not None, line
    assert (match.group(2), match.group(1)) == (stall.trace_id, stall.span_id)
    assert float(match.group(3)) == pytest.approx(stall.duration)
    assert float(match.group(4)) == pytest.approx(stall.started_at + stall.duration, abs=1e-3)
    le = float(re.search(r'le="([^"]+)"', line).group(1))  # type: ignore[union-attr]
    assert stall.duration <= le and 'route="/block"' in line
    assert sum("# {" in ln for ln in text.splitlines()) == 1  # one stall, one exemplar
    # the Prometheus text format has no exemplars
    from prometheus_client import generate_latest

    assert "trace_id" not in generate_latest(registry).decode()


def test_stall_log_record_carries_the_trace_ids(otel: Otel, registry: CollectorRegistry) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger("loopwatch").addHandler(handler)
    try:
        log = StallLog()
        with serve(build_app(otel, registry, log)) as url:
            blocker_with_victim(url, registry)
            (stall,) = log.wait_for(1)
    finally:
        logging.getLogger("loopwatch").removeHandler(handler)
    (record,) = [r for r in records if r.getMessage().startswith("event loop blocked for")]
    assert (record.trace_id, record.span_id) == (stall.trace_id, stall.span_id)  # type: ignore[attr-defined]
    assert len(stall.trace_id) == 32 and len(stall.span_id) == 16


@pytest.mark.parametrize("how", ["option", "env"])
def test_off_by_option_or_environment(
    otel: Otel, registry: CollectorRegistry, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options: dict[str, Any] = {}
    if how == "option":
        options = {"otel": False, "tracer_provider": None, "meter_provider": None}
    else:
        monkeypatch.setenv("LOOPWATCH_OTEL", "0")
    log = StallLog()
    with serve(build_app(otel, registry, log, **options)) as url:
        blocker_with_victim(url, registry)
        (stall,) = log.wait_for(1)
        text = openmetrics(registry).decode()
    assert otel.named("loopwatch.stall") == []
    assert [e for s in otel.spans() for e in s.events if e.name == "loopwatch.blocked"] == []
    assert "loopwatch" not in [
        sm.scope.name
        for rm in (
            otel.reader.get_metrics_data() or type("", (), {"resource_metrics": []})()
        ).resource_metrics
        for sm in rm.scope_metrics
    ]
    assert (stall.trace_id, stall.span_id, stall.span_context) == ("", "", None)
    assert "trace_id" not in text
    assert otel.server_span("/block") is not None  # the app itself is still traced


def test_off_without_a_real_provider(registry: CollectorRegistry) -> None:
    """FastAPI loads opentelemetry-api; with no SDK provider configured loopwatch stays off."""
    assert "opentelemetry.trace" in sys.modules
    log = StallLog()
    app = build_app(None, registry, log)
    with serve(app) as url:
        blocker_with_victim(url, registry)
        (stall,) = log.wait_for(1)
    assert stall.trace_id == "" and stall.span_context is None


def test_bad_provider_arguments_are_refused_at_construction() -> None:
    app = FastAPI()
    with pytest.raises(
        ConfigError,
        match=r"invalid tracer_provider=.*expected an OpenTelemetry provider with get_tracer\(\)",
    ):
        LoopWatchMiddleware(app, tracer_provider=object())
    with pytest.raises(
        ConfigError, match=r"invalid meter_provider=.*expected None when otel=False"
    ):
        LoopWatchMiddleware(app, otel=False, meter_provider=MeterProvider())
    with pytest.raises(ConfigError, match=r"LOOPWATCH_OTEL.*one of 1/0"):
        from loopwatch import Settings

        Settings.resolve(env={"LOOPWATCH_OTEL": "maybe"})


GLOBAL_PROVIDER_SCRIPT = """
import asyncio, contextlib, json, sys, time
import httpx
from fastapi import FastAPI
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from loopwatch import LoopWatchMiddleware
from tests.serving import serve

exporter, reader = InMemoryExporter = InMemorySpanExporter(), InMemoryMetricReader()

@contextlib.asynccontextmanager
async def lifespan(app):
    # the SDK is configured in the app's own start-up: after loopwatch's middleware exists
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    yield

app = FastAPI(lifespan=lifespan)

@app.get("/block")
async def block():
    time.sleep(0.45)
    return {}

app.add_middleware(LoopWatchMiddleware, threshold=0.25)
with serve(app) as url:
    httpx.get(url + "/block", timeout=10)
    deadline = time.monotonic() + 5
    while not [s for s in exporter.get_finished_spans() if s.name == "loopwatch.stall"]:
        assert time.monotonic() < deadline, "no stall span"
        time.sleep(0.05)
names = [m.name for rm in reader.get_metrics_data().resource_metrics
         for sm in rm.scope_metrics for m in sm.metrics if sm.scope.name == "loopwatch"]
print(json.dumps({"spans": [s.name for s in exporter.get_finished_spans()], "metrics": names}))
"""


def test_global_sdk_providers_are_found_at_start_up_not_at_import() -> None:
    out = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDER_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.splitlines()[-1])
    assert "loopwatch.stall" in found["spans"]
    assert {"loopwatch.stall.duration", "loopwatch.event_loop.lag"} <= set(found["metrics"])


def test_stall_is_a_dataclass_with_trace_fields() -> None:
    stall = Stall(
        "/r", "GET", "cpu", 1.0, 0.0, "<unknown>", "", trace_id="a" * 32, span_id="b" * 16
    )
    assert stall.as_dict()["trace_id"] == "a" * 32
    assert "span_context" not in stall.as_dict() and "span_context" not in repr(stall)
