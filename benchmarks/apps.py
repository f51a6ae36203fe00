"""The apps the benchmarks serve, one variant per process: ``uvicorn benchmarks.apps:app``.

The environment picks the variant, so every server is started the same way:

- ``BENCH_VARIANT``: one of ``VARIANTS`` or ``PARTS`` (default ``bare``).
- ``BENCH_ROUTES``: how many routes to register, ``GET /r{i}/{item_id}`` for i in 0..N-1
  (default 1). The benchmark hits the last one, the worst case for a router walk.
- ``BENCH_METRICS_PORT``: loopwatch's side port (``metrics_port``), for the detection run.
- ``BENCH_BLOCK``: ``1`` adds ``GET /block?seconds=X[&cpu=1]``, an ``async def`` that blocks
  the loop (``time.sleep``, or a busy loop with ``cpu=1``) and returns its own ``time.monotonic()`` start and end, which the harness
  can compare with its clock (CLOCK_MONOTONIC is system-wide on Linux).

Every endpoint is the FastAPI tutorial's trivial one: ``async def`` returning a small dict,
no response model. No variant mounts a metrics endpoint on the app: only the per-request path
is measured.

The peer stall detectors run as their READMEs set them up on a FastAPI app, defaults otherwise:
``asynclens`` (0.1.2), an ``AsyncWatchdog`` entered in the lifespan (a 10 ms heartbeat task on
the loop and a native thread that checks it every 50 ms); ``aiocop`` (1.2.1),
``patch_audit_functions``, ``start_blocking_io_detection`` and ``detect_slow_tasks`` at import
(stdlib socket and os calls wrapped to emit audit events, an audit hook, a CPU-sampler thread),
then ``activate()`` in the lifespan, which patches the running loop's ``call_soon``,
``call_later``, ``call_at`` and ``call_soon_threadsafe`` so each callback scheduled through them
is wrapped and timed (under uvloop: task steps and future callbacks, two per request here).
Their alerts go to uvicorn's error logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI

__all__ = ["PARTS", "VARIANTS", "NoopMiddleware", "app", "build"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

VARIANTS: tuple[str, ...] = (
    "bare",
    "noop",
    "loopwatch-stalls",
    "loopwatch-no-loop-time",
    "loopwatch",
    "instrumentator",
    "starlette-exporter",
    "otel",
    "otel+loopwatch",  # loopwatch inside a traced app, its OpenTelemetry on
    "otel+loopwatch-otel-off",  # the same with otel=False: the difference is its OTel cost
    "asynclens",  # a heartbeat task and a native watchdog thread; names no route
    "aiocop",  # every loop callback wrapped and timed, an audit hook, a sampler thread
)
# parts of loopwatch alone, to price them under a real server (named with --variants only)
PARTS: tuple[str, ...] = (
    "loopwatch-monitor",  # the monitor runs (heartbeat, watchdog), requests pass by
    "loopwatch-monitor-profile",  # the same with the loop profile's CPU-time signal
    "loopwatch-stalls-no-profile",  # stalls only, the loop profile off
    "loopwatch-run",  # the bare app served under `loopwatch run` (run.py starts it so)
)


class NoopMiddleware:
    """A pure ASGI middleware that does nothing: the floor for any middleware's cost."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _endpoint(name: str) -> Callable[[str], Awaitable[dict[str, str]]]:
    async def endpoint(item_id: str) -> dict[str, str]:
        return {"route": name, "item": item_id}

    endpoint.__name__ = f"endpoint_{name}"
    return endpoint


async def block(seconds: float, cpu: bool = False) -> dict[str, float]:
    """Fake async: holds the event loop for ``seconds``, asleep or (``cpu``) computing."""
    start = time.monotonic()
    if cpu:
        deadline = start + seconds
        while time.monotonic() < deadline:
            sum(range(1000))
    else:
        time.sleep(seconds)
    end = time.monotonic()
    return {"start": start, "end": end}


def _otel_providers() -> tuple[Any, Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class DropExporter(SpanExporter):
        """Spans are built and batched as in production, then dropped instead of sent."""

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return tracer_provider, meter_provider


def _instrument_otel(app: FastAPI, providers: tuple[Any, Any] | None = None) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    tracer_provider, meter_provider = providers or _otel_providers()
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracer_provider, meter_provider=meter_provider
    )


@contextlib.asynccontextmanager
async def _asynclens_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """asynclens's FastAPI example: the watchdog entered on the running loop for the app's life."""
    from asynclens import AsyncWatchdog

    async with AsyncWatchdog(threshold_ms=50, logger=logging.getLogger("uvicorn.error")):
        yield


def _aiocop_setup() -> None:
    """aiocop's "Usage with ASGI": set up once at import, before the app serves anything."""
    import aiocop

    def on_slow_task(event: aiocop.SlowTaskEvent) -> None:  # stands in for the README's metrics
        if event.exceeded_threshold:
            logging.getLogger("uvicorn.error").warning(
                "aiocop: %s task %.1f ms", event.reason, event.elapsed_ms
            )

    aiocop.patch_audit_functions()
    aiocop.start_blocking_io_detection(trace_depth=20)
    aiocop.detect_slow_tasks(threshold_ms=30, on_slow_task=on_slow_task)


@contextlib.asynccontextmanager
async def _aiocop_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """aiocop's ASGI lifespan: ``activate()`` patches the running loop, after start-up."""
    import aiocop

    aiocop.activate()
    yield
    aiocop.deactivate()


def build(
    variant: str, routes: int = 1, *, metrics_port: int | None = None, block_route: bool = False
) -> FastAPI:
    """A FastAPI app with ``routes`` trivial routes and the instrumentation ``variant`` names."""
    if variant not in VARIANTS + PARTS:
        raise ValueError(
            f"BENCH_VARIANT={variant!r}: expected one of {', '.join(VARIANTS + PARTS)}"
        )
    if routes < 1:
        raise ValueError(f"BENCH_ROUTES={routes!r}: expected a whole number of at least 1")
    lifespan: Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]] | None = None
    if variant == "asynclens":
        lifespan = _asynclens_lifespan
    elif variant == "aiocop":
        _aiocop_setup()
        lifespan = _aiocop_lifespan
    app = FastAPI(lifespan=lifespan)
    for i in range(routes):
        app.add_api_route(f"/r{i}/{{item_id}}", _endpoint(str(i)), methods=["GET"],
                          response_model=None)  # fmt: skip
    if block_route:
        app.add_api_route("/block", block, methods=["GET"], response_model=None)

    if variant == "loopwatch-run":
        pass  # no code change: the runner wraps the app uvicorn loads
    elif variant == "noop":
        app.add_middleware(NoopMiddleware)
    elif variant.startswith("loopwatch-monitor"):
        app.add_middleware(
            _passing_middleware(), request_metrics=False, loop_time=False,
            profile=variant == "loopwatch-monitor-profile",
        )  # fmt: skip
    elif variant.startswith("loopwatch"):
        from loopwatch import LoopWatchMiddleware

        # stalls only: no request metrics, no loop time; defaults: both
        stalls = variant.startswith("loopwatch-stalls")
        app.add_middleware(
            LoopWatchMiddleware,
            request_metrics=not stalls,
            loop_time=variant == "loopwatch",
            metrics_port=metrics_port,
            profile=variant != "loopwatch-stalls-no-profile",
        )
    elif variant == "instrumentator":
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator().instrument(app)
    elif variant == "starlette-exporter":
        from starlette_exporter import PrometheusMiddleware

        app.add_middleware(PrometheusMiddleware)
    elif variant == "otel":
        _instrument_otel(app)
    elif variant.startswith("otel+loopwatch"):
        from loopwatch import LoopWatchMiddleware

        providers = _otel_providers()
        on = variant == "otel+loopwatch"
        given = {"tracer_provider": providers[0], "meter_provider": providers[1]} if on else {}
        app.add_middleware(LoopWatchMiddleware, otel=on, metrics_port=metrics_port, **given)
        _instrument_otel(app, providers)  # outside loopwatch, as usual
    return app


def _passing_middleware() -> type:
    """loopwatch whose monitor runs (the lifespan starts it) and whose requests pass by."""
    from loopwatch import LoopWatchMiddleware

    class Passing(LoopWatchMiddleware):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await super().__call__(scope, receive, send)
            else:
                await self.app(scope, receive, send)

    return Passing


def _int_env(name: str, default: int | None) -> int | None:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a whole number") from None


def _from_env() -> FastAPI:
    routes = _int_env("BENCH_ROUTES", 1)
    return build(
        os.environ.get("BENCH_VARIANT", "bare"),
        routes if routes is not None else 1,
        metrics_port=_int_env("BENCH_METRICS_PORT", None),
        block_route=os.environ.get("BENCH_BLOCK", "") == "1",
    )


app = _from_env()
