"""The public surface, and what ``import loopwatch`` costs."""

from __future__ import annotations

import json
import subprocess
import sys

import loopwatch


def test_public_surface_is_pinned() -> None:
    assert loopwatch.__all__ == sorted(loopwatch.__all__, key=lambda n: (not n.isupper(), n))
    assert set(loopwatch.__all__) == {
        "BACKGROUND",
        "SERVER",
        "UNMATCHED",
        "ConfigError",
        "LoopWatchMiddleware",
        "MetricsServer",
        "Monitor",
        "Settings",
        "Stall",
        "__version__",
        "clear_recent_stalls",
        "metrics_app",
        "recent_stalls",
        "watch",
    }
    for name in loopwatch.__all__:
        assert getattr(loopwatch, name) is not None


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return set(json.loads(out.stdout))


def test_import_loopwatch_loads_no_web_framework_and_no_prometheus() -> None:
    loaded = _modules_after("import loopwatch")
    for framework in ("fastapi", "starlette", "uvicorn", "prometheus_client", "opentelemetry"):
        assert framework not in loaded, framework


def test_the_middleware_itself_needs_no_web_framework() -> None:
    loaded = _modules_after("from loopwatch import LoopWatchMiddleware, metrics_app")
    assert "prometheus_client" in loaded
    for framework in ("fastapi", "starlette", "uvicorn", "opentelemetry", "loopwatch.otel"):
        assert framework not in loaded, framework


def test_a_running_app_without_opentelemetry_never_imports_it() -> None:
    """opentelemetry-api is installed here, but nothing in this app uses it: loopwatch starts,
    serves a blocking request and stops without importing it (or its own otel module)."""
    loaded = _modules_after(
        """
import asyncio, time
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from loopwatch import LoopWatchMiddleware, recent_stalls

async def block(request):
    time.sleep(0.3)
    return PlainTextResponse("ok")

app = LoopWatchMiddleware(Starlette(routes=[Route("/block", block)]), threshold=0.1)

async def main():
    startup = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    sent = []
    async def lifespan_send(message):
        sent.append(message["type"])
    life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                   startup.get, lifespan_send))
    while "lifespan.startup.complete" not in sent:
        await asyncio.sleep(0.01)
    async def receive():
        return {"type": "http.request", "body": b""}
    async def send(message):
        pass
    scope = {"type": "http", "method": "GET", "path": "/block", "root_path": "",
             "headers": [], "query_string": b"", "asgi": {"version": "3.0"}}
    await app(scope, receive, send)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if recent_stalls():
            break
    assert recent_stalls(), "no stall seen"
    await startup.put({"type": "lifespan.shutdown"})
    await life

asyncio.run(main())
"""
    )
    assert "loopwatch.middleware" in loaded and "starlette" in loaded
    assert not {m for m in loaded if m.startswith("opentelemetry")}, "opentelemetry imported"
    assert "loopwatch.otel" not in loaded


def test_core_modules_import_only_the_standard_library() -> None:
    loaded = _modules_after("import loopwatch.monitor, loopwatch.requests, loopwatch.config")
    assert "prometheus_client" not in loaded
