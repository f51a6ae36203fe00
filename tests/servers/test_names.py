"""Long and odd names (route templates, file paths, function names) are escaped and cut the
same way in every view: labels, the ring, the log line and ``loopwatch report``."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from loopwatch import LoopWatchMiddleware, metrics_app
from loopwatch.cli import main
from loopwatch.names import MAX_NAME
from tests.helpers import StallLog, series
from tests.serving import serve

# a 5,000-character template, and one with a newline, a terminal escape, a bell and a tab
LONG = "/long/" + "x" * 5000 + "/{item}"
LONG_PATH = LONG.replace("{item}", "1")
LONG_LABEL = LONG[: MAX_NAME - 1] + "\u2026"
ODD = "/odd/\x1b[31mred\x07\tend\n{item}"
ODD_PATH = "/odd/%1B%5B31mred%07%09end%0A1"  # uvicorn decodes it into the scope's path
ODD_LABEL = "/odd/\\x1b[31mred\\x07\\tend\\n{item}"

BLOCKER = "block_" + "y" * 400  # a 406-character function name: the culprit's

MODULE = f"""
import time


def {BLOCKER}(seconds):
    time.sleep(seconds)
"""


def load_blocker(tmp_path: Path) -> ModuleType:
    path = tmp_path / "blocking_names.py"
    path.write_text(MODULE)
    spec = importlib.util.spec_from_file_location("blocking_names", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def names_app(registry: CollectorRegistry, log: StallLog, module: ModuleType) -> Any:
    block = getattr(module, BLOCKER)

    async def endpoint(request: Request) -> PlainTextResponse:
        block(0.5)  # fake async: sleeps on the loop
        return PlainTextResponse("done")

    async def odd(request: Request) -> PlainTextResponse:
        # an endpoint of its own: on Starlette before scope["route"] (0.27) a route is found
        # by its endpoint function, and two routes sharing one share the first's template
        return await endpoint(request)

    routes = [Route(LONG, endpoint), Route(ODD, odd), Mount("/metrics", metrics_app(registry))]
    app = Starlette(routes=routes)
    return LoopWatchMiddleware(app, registry=registry, threshold=0.2, on_stall=log)


def no_control(text: str) -> bool:
    return not any(ord(c) < 32 or ord(c) == 127 for c in text)


def test_long_and_odd_names_are_cut_and_escaped_in_every_view(
    tmp_path: Path,
    loop_impl: str,
    registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = StallLog()
    app = names_app(registry, log, load_blocker(tmp_path))
    caplog.set_level(logging.WARNING, logger="loopwatch")
    with serve(app, loop=loop_impl) as url:
        assert httpx.get(url + LONG_PATH, timeout=10).text == "done"
        assert httpx.get(url + ODD_PATH, timeout=10).text == "done"
        stalls = log.wait_for(2)
        capsys.readouterr()
        assert main(["report", url + "/metrics", "--plain"]) == 0
        plain = capsys.readouterr().out
        assert main(["report", url + "/metrics"]) == 0  # through rich, when installed
        rich = capsys.readouterr().out

    # one name for each route, in the labels and the ring
    assert {s.route for s in stalls} == {LONG_LABEL, ODD_LABEL}
    labelled = {s["route"] for s in series(registry, "loopwatch_stalls_total")}
    assert {LONG_LABEL, ODD_LABEL} <= labelled
    requested = {s["route"] for s in series(registry, "loopwatch_requests_total")}
    assert {LONG_LABEL, ODD_LABEL} <= requested
    assert all(len(r) <= MAX_NAME and no_control(r) for r in labelled | requested)
    for stall in stalls:
        # the culprit names the blocking function, cut, on one line
        assert "blocking_names.py:6 in block_yyy" in stall.culprit, stall.culprit
        assert stall.culprit.endswith("\u2026") and len(stall.culprit) < 400
        for line in stall.stack.splitlines():
            assert len(line) < 420 and no_control(line), line

    # the log line: one line each, bounded
    lines = [r.getMessage() for r in caplog.records if "event loop blocked for" in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:
        assert "\n" not in line and no_control(line) and len(line) < 800, line
    assert any(ODD_LABEL in line for line in lines)

    # loopwatch report: every line bounded, no control character, the table intact
    for out in (plain, rich):
        assert no_control(out.replace("\n", "")), out
        assert max(len(line) for line in out.splitlines()) <= 260, out
        rows = table_lines(out)
        long_row = [r for r in rows if r.startswith("GET /long/xxx")]
        odd_row = [r for r in rows if r.startswith("GET /odd/\\x1b[31mred\\x07\\tend\\n{item}")]
        assert len(long_row) == 1 and len(odd_row) == 1, out
        for row in long_row + odd_row:
            cells = re.split(r"\s{2,}", row)
            assert cells[1:3] == ["1", "1"], row  # requests, stalls: the columns line up
            # the culprit: its file and line kept, the path and the function name cut
            assert re.fullmatch(r".*blocking_names\.py:6 in block_y+\u2026", cells[-1]), row
            assert len(cells[-1]) <= 80, row
        assert "\u2026" in long_row[0].split("  ")[0]


def table_lines(output: str) -> list[str]:
    """The rows of the diagnosis table: the lines between its header rule and a blank line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("route"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(line.strip())
    return rows
