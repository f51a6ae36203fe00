"""A real trace of a stall, printed as span trees: the README's OpenTelemetry example.

``python scripts/otel_trace.py`` serves a small FastAPI app (the OpenTelemetry SDK with an
in-memory exporter, the FastAPI instrumentation, loopwatch) under uvicorn on 127.0.0.1, sends
``GET /report`` and, while it waits, ``POST /orders/{id}`` whose handler blocks the loop,
then prints each trace: spans with their offsets and durations, attributes of loopwatch's own
spans, and span events.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loopwatch import LoopWatchMiddleware, Monitor
from tests.serving import serve

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("shop")

app = FastAPI()


def sign(payload: bytes) -> str:
    digest = payload
    for _ in range(400_000):  # CPU on the event loop: the bug
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


@app.post("/orders/{order_id}")
async def create_order(order_id: int) -> dict[str, Any]:
    with tracer.start_as_current_span("sign order"):
        signature = sign(str(order_id).encode())
    return {"order": order_id, "signature": signature[:16]}


@app.get("/report")
async def report() -> dict[str, str]:
    await asyncio.sleep(0.05)  # really async, and yet slow: it waits for the loop
    return {"report": "ok"}


app.add_middleware(LoopWatchMiddleware, threshold=0.1, tracer_provider=provider)
FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)


def tree(spans: list[ReadableSpan]) -> None:
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans if s.context is not None}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        by_parent.setdefault(parent if parent in ids else None, []).append(span)
    t0 = min(s.start_time or 0 for s in spans)

    def show(span: ReadableSpan, depth: int) -> None:
        start = ((span.start_time or 0) - t0) / 1e6
        length = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        pad = "  " * depth
        print(f"{pad}{span.name}  [+{start:.0f} ms, {length:.0f} ms]")
        if span.name == "loopwatch.stall":
            for key, value in (span.attributes or {}).items():
                if key != "code.stacktrace":
                    print(f"{pad}    {key} = {value!r}")
        for event in span.events:
            at = (event.timestamp - t0) / 1e6
            print(f"{pad}    event {event.name} at +{at:.0f} ms")
            for key, value in (event.attributes or {}).items():
                print(f"{pad}      {key} = {value!r}")
        for child in sorted(
            by_parent.get(span.context.span_id, []), key=lambda s: s.start_time or 0
        ):  # type: ignore[union-attr]
            show(child, depth + 1)

    for root in sorted(by_parent.get(None, []), key=lambda s: s.start_time or 0):
        show(root, 0)


def main() -> None:
    with serve(app) as url, httpx.Client(timeout=10) as client:
        client.get(f"{url}/report")  # warm up
        exporter.clear()
        victim = threading.Thread(target=client.get, args=(f"{url}/report",))
        victim.start()
        time.sleep(0.02)
        client.post(f"{url}/orders/42")
        victim.join()
        for monitor in list(Monitor._by_loop.values()):
            monitor.settle(2.0)
    spans = list(exporter.get_finished_spans())
    traces: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        traces.setdefault(span.context.trace_id, []).append(span)  # type: ignore[union-attr]
    for trace_spans in sorted(traces.values(), key=lambda ss: min(s.start_time or 0 for s in ss)):
        print(f"trace {trace_spans[0].context.trace_id:032x}")  # type: ignore[union-attr]
        tree([s for s in trace_spans if "http send" not in s.name and "http receive" not in s.name])
        print()


if __name__ == "__main__":
    main()
