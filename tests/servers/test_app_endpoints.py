"""``metrics_app(app_endpoints=...)`` / ``LOOPWATCH_APP_ENDPOINTS``: what the app's own mount
(often as public as the app) serves, on a real uvicorn (asyncio and uvloop) after a real stall;
the side port serves everything whatever the option; a bad value stops the server at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loopwatch import ConfigError, LoopWatchMiddleware, metrics_app
from tests.asgi.test_config import QUICKSTART
from tests.serving import free_port, serve

HOLD = 0.6  # six times the default threshold (0.1 s)


def block_the_loop_here() -> None:
    time.sleep(HOLD)  # fake async: the culprit line every view but the app mount names


def build(registry: CollectorRegistry, app_endpoints: str) -> LoopWatchMiddleware:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.mount("/metrics", metrics_app(registry, app_endpoints=app_endpoints))

    @app.get("/block")
    async def block() -> dict[str, str]:
        block_the_loop_here()
        return {}

    return LoopWatchMiddleware(app, registry=registry, metrics_port=0)


@dataclass
class Served:
    mode: str  # the app_endpoints value
    app: str  # the app's base URL
    side: str  # the side port's base URL
    stall: dict[str, Any]  # the /block stall, as the side port reports it


@pytest.fixture(params=["all", "metrics", "summary"])
def served(request: pytest.FixtureRequest, loop_impl: str) -> Iterator[Served]:
    watched = build(CollectorRegistry(), str(request.param))
    assert watched.metrics_server is not None
    side = f"http://127.0.0.1:{watched.metrics_server.port}"
    try:
        with serve(watched, loop=loop_impl) as url:
            assert httpx.get(url + "/block", timeout=30).status_code == 200
            yield Served(str(request.param), url, side, wait_for_stall(side))
    finally:
        watched.close()


def wait_for_stall(side: str, timeout: float = 15.0) -> dict[str, Any]:
    """The /block stall, with its culprit, and its samples in the side port's profile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stalls = [s for s in httpx.get(side + "/stalls").json() if s["route"] == "/block"]
        if stalls and "block_the_loop_here" in httpx.get(side + "/profile").text:
            return dict(stalls[-1])
        time.sleep(0.05)
    raise AssertionError("no stall of /block reached the side port's /stalls and /profile")


def app_mount_paths(stall: dict[str, Any]) -> list[str]:
    """Every URL the mount could answer: the exposition, the stalls, the profile, the page."""
    return [
        "/metrics",
        "/metrics/",
        "/metrics/stalls",
        "/metrics/profile",
        "/metrics/profile?seconds=300",
        "/metrics/ui",
        "/metrics/ui/",
        "/metrics/ui/index.html",
        "/metrics/ui/app.js",
        "/metrics/ui/style.css",
        "/metrics/ui/state.json",
        "/metrics/ui/timeline.json?since=0",
        "/metrics/ui/routes.json",
        "/metrics/ui/stalls.json",
        f"/metrics/ui/stalls.json?stack={stall['started_at']}",
    ]


def code_locations(stall: dict[str, Any]) -> list[str]:
    """What must not leave through a restricted mount: the culprit, its file and line, the
    function, and any stack frame (``File "..."``, ``.py:``)."""
    culprit = stall["culprit"]
    location = culprit.rsplit(" in ", 1)[0]  # path:line
    assert location.startswith(__file__), culprit  # the real culprit: this file's sleep
    return [
        culprit,
        location,
        __file__,
        os.path.basename(location),  # test_app_endpoints.py:NN
        str(Path(__file__).parent),
        "block_the_loop_here",
        ".py:",
        'File "',
        "site-packages",
    ]


def test_the_side_port_serves_everything_whatever_the_option(served: Served) -> None:
    stall = served.stall
    assert stall["duration"] >= HOLD * 0.8 and "block_the_loop_here" in stall["culprit"]
    assert "block_the_loop_here" in stall["stack"]
    assert "loopwatch_stall_seconds_total" in httpx.get(served.side + "/metrics").text
    state = httpx.get(served.side + "/ui/state.json").json()
    assert state["code"] is True and state["profile"] is True
    routes = httpx.get(served.side + "/ui/routes.json").json()["routes"]
    assert [r["culprit"] for r in routes if r["route"] == "/block"] == [stall["culprit"]]
    stacked = httpx.get(served.side + f"/ui/stalls.json?stack={stall['started_at']}").json()
    assert "block_the_loop_here" in stacked["stalls"][0]["stack"]
    assert '<script src="ui/app.js"' in httpx.get(served.side + "/").text


# what the restricted mounts answer 404 (the exposition is served by every value)
REFUSED = {
    "all": (),
    "metrics": ("/metrics/stalls", "/metrics/profile", "/metrics/ui"),
    "summary": ("/metrics/profile",),
}


def test_the_app_mount_serves_what_the_option_says(served: Served) -> None:
    bodies = {}
    for path in app_mount_paths(served.stall):
        response = httpx.get(served.app + path)
        refused = path.startswith(REFUSED[served.mode])
        assert response.status_code == (404 if refused else 200), (served.mode, path)
        bodies[path] = response.text
    for path in ("/metrics", "/metrics/"):
        assert (
            'loopwatch_stall_duration_seconds_count{kind="wait",method="GET",route="/block"} 1.0'
            in (bodies[path])
        )
    locations = code_locations(served.stall)
    leaked = [(p, s) for p, body in bodies.items() for s in locations if s in body]
    if served.mode == "all":  # the check can fail: everything is there with "all"
        assert ("/metrics/stalls", served.stall["culprit"]) in leaked
        assert ("/metrics/profile", "block_the_loop_here") in leaked
        assert ("/metrics/ui/routes.json", served.stall["culprit"]) in leaked
        return
    assert leaked == []
    assert httpx.head(served.app + "/metrics/profile").status_code == 404
    if served.mode == "metrics":
        assert httpx.head(served.app + "/metrics/ui").status_code == 404
        return
    # summary: the stall, its route and its duration, and nothing that points into the code
    stalls = [s for s in json.loads(bodies["/metrics/stalls"]) if s["route"] == "/block"]
    assert stalls == [
        {k: v for k, v in served.stall.items() if k in SUMMARY_FIELDS}
    ]  # the same stall the side port reports, cut to the summary's fields
    assert set(stalls[0]) == SUMMARY_FIELDS
    state = json.loads(bodies["/metrics/ui/state.json"])
    assert state["code"] is False and state["profile"] is False
    routes = json.loads(bodies["/metrics/ui/routes.json"])["routes"]
    [row] = [r for r in routes if r["route"] == "/block"]
    assert row["stalls"] == 1 and row["culprit"] is None and row["worst"] >= HOLD * 0.8
    for path in ("/metrics/ui/stalls.json", app_mount_paths(served.stall)[-1]):
        [page_stall] = [s for s in json.loads(bodies[path])["stalls"] if s["route"] == "/block"]
        assert set(page_stall) == SUMMARY_FIELDS, path


SUMMARY_FIELDS = {
    "route",
    "method",
    "kind",
    "duration",
    "started_at",
    "requests_in_flight",
    "cpu_seconds",
    "gc_seconds",
    "gc_generation",
}


def test_a_bad_value_is_a_config_error_naming_the_option() -> None:
    with pytest.raises(ConfigError) as raised:
        metrics_app(app_endpoints="public")
    assert str(raised.value) == (
        "loopwatch: invalid app_endpoints='public' (from argument): "
        "expected one of 'all', 'metrics', 'summary'"
    )
    with pytest.raises(ConfigError, match="invalid app_endpoints=True"):
        metrics_app(app_endpoints=True)  # type: ignore[arg-type]
    assert metrics_app(app_endpoints=" Summary ").app_endpoints == "summary"
    assert metrics_app().app_endpoints == "all"


@pytest.mark.parametrize("lifespan", ["on", "off"])
def test_a_bad_environment_value_stops_uvicorn_at_start_up(
    tmp_path: Path, loop_impl: str, lifespan: str
) -> None:
    (tmp_path / "public_app.py").write_text(QUICKSTART)
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "public_app:app", "--app-dir", str(tmp_path),
         "--host", "127.0.0.1", "--port", str(free_port()), "--loop", loop_impl,
         "--lifespan", lifespan],
        env={**os.environ, "LOOPWATCH_APP_ENDPOINTS": "stalls-only"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output  # it never served: it stopped on its own
    assert (
        "invalid app_endpoints='stalls-only' (from environment variable "
        "LOOPWATCH_APP_ENDPOINTS): expected one of 'all', 'metrics', 'summary'"
    ) in output
