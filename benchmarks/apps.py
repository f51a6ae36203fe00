"""The apps the benchmarks serve, one variant per process: ``uvicorn benchmarks.apps:app``.

The environment picks the variant, so every server is started the same way:

- ``BENCH_VARIANT``: one of ``VARIANTS`` (default ``bare``).
- ``BENCH_ROUTES``: how many routes to register, ``GET /r{i}/{item_id}`` for i in 0..N-1
  (default 1). The benchmark hits the last one, the worst case for a router walk.
- ``BENCH_METRICS_PORT``: loopwatch's side port (``metrics_port``), for the detection run.
- ``BENCH_BLOCK``: ``1`` adds ``GET /block?seconds=X[&cpu=1]``, an ``async def`` that blocks
  the loop (``time.sleep``, or a busy loop with ``cpu=1``) and returns its own ``time.monotonic()`` start and end, which the harness
  can compare with its clock (CLOCK_MONOTONIC is system-wide on Linux).

Every endpoint is the FastAPI tutorial's trivial one: ``async def`` returning a small dict,
no response model. No variant mounts a metrics endpoint on the app: only the per-request path
is measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI

__all__ = ["VARIANTS", "NoopMiddleware", "app", "build"]

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


def _instrument_otel(app: FastAPI) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
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
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracer_provider, meter_provider=meter_provider
    )


def build(
    variant: str, routes: int = 1, *, metrics_port: int | None = None, block_route: bool = False
) -> FastAPI:
    """A FastAPI app with ``routes`` trivial routes and the instrumentation ``variant`` names."""
    if variant not in VARIANTS:
        raise ValueError(f"BENCH_VARIANT={variant!r}: expected one of {', '.join(VARIANTS)}")
    if routes < 1:
        raise ValueError(f"BENCH_ROUTES={routes!r}: expected a whole number of at least 1")
    app = FastAPI()
    for i in range(routes):
        app.add_api_route(f"/r{i}/{{item_id}}", _endpoint(str(i)), methods=["GET"],
                          response_model=None)  # fmt: skip
    if block_route:
        app.add_api_route("/block", block, methods=["GET"], response_model=None)

    if variant == "noop":
        app.add_middleware(NoopMiddleware)
    elif variant.startswith("loopwatch"):
        from loopwatch import LoopWatchMiddleware

        # stalls only: no request metrics, no loop time; defaults: both
        app.add_middleware(
            LoopWatchMiddleware,
            request_metrics=variant != "loopwatch-stalls",
            loop_time=variant == "loopwatch",
            metrics_port=metrics_port,
        )
    elif variant == "instrumentator":
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator().instrument(app)
    elif variant == "starlette-exporter":
        from starlette_exporter import PrometheusMiddleware

        app.add_middleware(PrometheusMiddleware)
    elif variant == "otel":
        _instrument_otel(app)
    return app


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
