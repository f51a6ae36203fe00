"""The demo app traced with OpenTelemetry, for the end-to-end test: an SDK TracerProvider set
globally (spans are sampled and then dropped: no exporter) and the FastAPI instrumentation,
as a traced service would have them. ``demo_app`` itself stays free of OpenTelemetry."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider

from demo_app.main import app

trace.set_tracer_provider(TracerProvider())  # before start-up, where loopwatch looks for it
FastAPIInstrumentor.instrument_app(app)

__all__ = ["app"]
