"""The demo app traced with OpenTelemetry, for the end-to-end test: an SDK TracerProvider set
globally (spans are sampled and then dropped: no exporter) and the FastAPI instrumentation,
as a traced service would have them. ``demo_app`` itself stays free of OpenTelemetry. One
route of its own, ``GET /long``: a single stall of ``E2E_LONG_SECONDS`` (3 s by default), long
enough that a stall booked in one lump when it ends, not while it lasts, would show."""

from __future__ import annotations

import os
import time

from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from demo_app.main import app

trace.set_tracer_provider(TracerProvider())  # before start-up, where loopwatch looks for it
FastAPIInstrumentor.instrument_app(app)


@app.get("/long")
async def long_endpoint() -> dict[str, float]:
    seconds = float(os.environ.get("E2E_LONG_SECONDS", "3"))
    time.sleep(seconds)  # holds the loop: one long stall
    return {"held": seconds}


__all__ = ["app"]
