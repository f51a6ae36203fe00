"""``loopwatch profile``: top routes and lines from a live app's loop profile, the flame graph
SVG it writes, and one-line errors."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loopwatch.cli import main
from loopwatch.profile import KEEP_SECONDS, PROFILE
from tests.servers.test_profile import profile_app
from tests.serving import free_port, serve


@pytest.fixture(autouse=True)
def _fresh_profile() -> Iterator[None]:
    PROFILE.clear()
    yield
    PROFILE.clear()


@pytest.fixture
def loaded_app(registry: CollectorRegistry) -> Iterator[str]:
    """A live app whose /slices route has burned ~1.2 s of loop time in short slices."""
    with serve(profile_app(registry)) as url:
        asyncio.run(_drive(url, ["/slices", "/await"] * 30))
        yield url


async def _drive(url: str, paths: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for path in paths:
            assert (await client.get(path)).status_code == 200


def test_prints_top_routes_with_their_lines_and_writes_the_svg(
    loaded_app: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svg = tmp_path / "loop.svg"
    assert main(["profile", loaded_app + "/metrics", "--svg", str(svg), "--plain"]) == 0
    out = capsys.readouterr().out
    assert "in the last 60 s, sampled" in out
    assert "share = of that sampled time" in out and "since the app started" in out
    rows = re.findall(r"^(GET /\S+|- <\w+>)\s+([\d.]+)%\s+([\d.]+)\s+(\S+)$", out, re.MULTILINE)
    assert rows and rows[0][0] == "GET /slices", out  # the route that burns, first
    share, sampled, busy = float(rows[0][1]), float(rows[0][2]), float(rows[0][3])
    assert share > 50 and sampled > 0.3, out
    assert busy > 0.8, out  # 30 x 5 x 8 ms = 1.2 s, exact, from the busy counter
    # the burning function, in this test suite's own file, is among the route's top lines
    # (sampled: a sample tends to land where the loop thread lets go of the GIL, such as a
    # socket write, so it is not always the first)
    block = out.split("  GET /slices\n", 1)[1]
    # a route's lines are indented 4 and their share right-aligned ("100.0%" fills it)
    lines = [line for line in block.splitlines()[:3] if line.startswith("    ")]
    assert any(
        re.search(r"%\s+tests/servers/test_profile\.py:\d+ in burning_function$", line)
        for line in lines
    ), out
    assert f"Flame graph written to {svg}" in out
    root = ET.parse(svg).getroot()
    names = [g.get("data-n") or "" for g in root.iter("{http://www.w3.org/2000/svg}g")]
    assert any(n.startswith("burning_function (") for n in names)
    assert "GET /slices" in names


def test_profile_url_side_port_form_and_top(
    registry: CollectorRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    app = profile_app(registry, metrics_port=0)
    with serve(app) as url:
        asyncio.run(_drive(url, ["/slices", "/slices", "/deep"] * 8))  # 1.28 s and 0.16 s
        middleware = app.middleware_stack
        while middleware is not None and not hasattr(middleware, "metrics_server"):
            middleware = middleware.app  # type: ignore[attr-defined]
        port = middleware.metrics_server.port  # type: ignore[union-attr]
        code = main(
            ["profile", f"127.0.0.1:{port}/profile", "--top", "1", "--seconds", "30", "--plain"]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"from http://127.0.0.1:{port}/profile" in out and "last 30 s" in out
    assert re.search(r"^GET /slices\s", out, re.MULTILINE), out
    assert not re.search(r"^GET /deep\s", out, re.MULTILINE), out  # --top 1
    assert "more route(s); --top to show more" in out


def test_unreachable_url_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["profile", f"http://127.0.0.1:{port}/metrics", "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and captured.out == ""
    assert err.startswith("loopwatch profile: error: cannot reach http://127.0.0.1:"), err
    assert "/metrics/profile" in err


def test_an_app_without_a_profile_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    with serve(app) as url:
        assert main(["profile", url + "/metrics"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "HTTP 404: no loop profile there" in err, err


@pytest.mark.parametrize("value", ["0", str(KEEP_SECONDS + 1), "soon"])
def test_bad_seconds_are_refused_before_any_request(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["profile", "127.0.0.1:1", "--seconds", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seconds: invalid value '{value}'" in err


def test_an_unwritable_svg_path_is_one_line_and_exit_1(
    loaded_app: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "loop.svg"
    assert main(["profile", loaded_app, "--svg", str(target), "--plain"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"loopwatch profile: error: cannot write {target}"), err


def test_busy_seconds_are_keyed_as_the_profile_spells_the_route() -> None:
    from loopwatch.cli.profile import busy_totals
    from loopwatch.profile import route_label

    text = (
        "# TYPE loopwatch_event_loop_busy_seconds_total counter\n"
        'loopwatch_event_loop_busy_seconds_total{method="GET",route="/a b/{id}"} 1.5\n'
        'loopwatch_event_loop_busy_seconds_total{method="GET",route="/plain"} 0.25\n'
    )
    totals = busy_totals(text)
    # the profile's first frame for a route with a space is "GET /a_b/{id}": the same key
    assert totals[route_label("GET", "/a b/{id}")] == 1.5
    assert totals["GET /plain"] == 0.25
