"""The loop profile (``/profile``): sampled loop stacks per route as collapsed stacks, on a real
uvicorn (asyncio and uvloop); its window, its bounds, and the flame graph SVG made from it."""

from __future__ import annotations

import asyncio
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loopwatch import LoopWatchMiddleware, metrics_app
from loopwatch.flamegraph import flamegraph_svg
from loopwatch.profile import (
    KEEP_SECONDS,
    MAX_DEPTH,
    MAX_NAME,
    MAX_OVERFLOW,
    MAX_STACKS,
    MAX_TOTAL,
    MORE_FRAMES,
    OTHER_STACKS,
    PROFILE,
    ProfileStore,
    clean,
    parse_collapsed,
    route_label,
)
from tests.serving import serve

LINE = re.compile(r"^[A-Z-]+ \S+(;[^;\n]+)+ \d+$")
FRAME = re.compile(r"^.+ \(.+:\d+\)$")
EVIL = "/evil<script>alert(\"x\")</script>'q'/{item}"


def burning_function(seconds: float) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass


def descend(depth: int) -> None:
    if depth:
        descend(depth - 1)
    else:
        burning_function(0.02)


def profile_app(registry: CollectorRegistry, **options: object) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/slices")
    async def slices() -> dict[str, str]:
        for _ in range(5):  # short sync slices, far below any stall threshold
            burning_function(0.008)
            await asyncio.sleep(0)
        return {}

    @app.get("/await")
    async def awaits() -> dict[str, str]:
        await asyncio.sleep(0.01)
        return {}

    @app.get("/deep")
    async def deep() -> dict[str, str]:
        descend(MAX_DEPTH * 2)
        return {}

    @app.get(EVIL)
    async def evil(item: str) -> dict[str, str]:
        burning_function(0.02)
        return {}

    app.add_middleware(LoopWatchMiddleware, registry=registry, **options)  # type: ignore[arg-type]
    app.mount("/metrics", metrics_app(registry))
    return app


@pytest.fixture(autouse=True)
def _fresh_profile() -> Iterator[None]:
    PROFILE.clear()
    yield
    PROFILE.clear()


async def _drive(url: str, paths: list[str], concurrency: int = 4) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(path: str) -> None:
            async with gate:
                assert (await client.get(path)).status_code == 200

        await asyncio.gather(*(one(p) for p in paths))


def by_route(text: str) -> dict[str, dict[tuple[str, ...], int]]:
    routes: dict[str, dict[tuple[str, ...], int]] = {}
    for stack, count in parse_collapsed(text):
        routes.setdefault(stack[0], {})[stack[1:]] = count
    return routes


@pytest.mark.parametrize("loop_time", [True, False], ids=["context", "by-task"])
def test_profile_names_the_burning_function_under_its_route(
    loop_impl: str, registry: CollectorRegistry, loop_time: bool
) -> None:
    # loop time off: the request is bound to its task, not its context; the loop thread's
    # samples name its route all the same
    app = profile_app(registry, loop_time=loop_time)
    with serve(app, loop=loop_impl) as url:
        asyncio.run(_drive(url, ["/slices", "/await"] * 40))
        response = httpx.get(url + "/metrics/profile")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    text = response.text
    lines = text.splitlines()
    assert lines, "empty profile"
    for line in lines:
        assert LINE.match(line), line
        for frame in line.rpartition(" ")[0].split(";")[1:]:
            assert FRAME.match(frame) or frame == MORE_FRAMES, frame
    routes = by_route(text)
    slices = routes.get("GET /slices", {})
    total = sum(slices.values())
    burning = sum(c for stack, c in slices.items() if "burning_function" in stack[-1])
    # 40 requests x 5 slices x 8 ms = 1.6 s of loop time: most of the route's samples
    assert total > 0 and burning >= 0.6 * total, (burning, total, slices)
    leaf = next(s[-1] for s in slices if "burning_function" in s[-1])
    assert leaf.startswith("burning_function (") and f"{__file__}:" in leaf, leaf
    # the event loop's own frames are dropped: stacks start at the task, not run_forever
    assert not any("run_forever" in ";".join(s) for r in routes.values() for s in r), text
    # a pure-await route burns nothing of its own
    awaited = routes.get("GET /await", {})
    assert not any("burning_function" in ";".join(s) for s in awaited)


def test_window_forgets_earlier_load_and_bad_seconds_are_400(
    registry: CollectorRegistry,
) -> None:
    app = profile_app(registry)
    with serve(app) as url:
        asyncio.run(_drive(url, ["/slices"] * 30))
        time.sleep(2.2)  # nothing runs: the last second of the profile holds none of it
        recent = httpx.get(url + "/metrics/profile?seconds=1").text
        window = httpx.get(url + "/metrics/profile?seconds=60").text
        kept = httpx.get(url + f"/metrics/profile?seconds={KEEP_SECONDS}").text
        bad = {
            value: httpx.get(url + "/metrics/profile", params={"seconds": value})
            for value in ("abc", "0", "-3", "1.5", "", str(KEEP_SECONDS + 1))
        }
    assert "GET /slices" not in by_route(recent), recent
    assert "GET /slices" in by_route(window)
    assert "GET /slices" in by_route(kept)
    for value, response in bad.items():
        assert response.status_code == 400, value
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert f"invalid seconds={value!r}" in response.text
        assert f"from 1 to {KEEP_SECONDS}" in response.text


def test_profile_off_samples_nothing(registry: CollectorRegistry) -> None:
    app = profile_app(registry, profile=False)
    with serve(app) as url:
        asyncio.run(_drive(url, ["/slices"] * 20))
        response = httpx.get(url + "/metrics/profile")
    assert response.status_code == 200 and response.text == ""


def test_side_port_serves_the_profile(registry: CollectorRegistry) -> None:
    app = profile_app(registry, metrics_port=0)
    with serve(app) as url:
        asyncio.run(_drive(url, ["/slices"] * 20))
        middleware = app.middleware_stack
        while not isinstance(middleware, LoopWatchMiddleware):
            middleware = middleware.app  # type: ignore[union-attr]
        server = middleware.metrics_server
        assert server is not None
        side = f"http://127.0.0.1:{server.port}"
        ok = httpx.get(side + "/profile")
        also = httpx.get(side + "/metrics/profile?seconds=30")
        bad = httpx.get(side + "/profile?seconds=nope")
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "text/plain; charset=utf-8"
    assert "burning_function" in by_route(ok.text).get("GET /slices", {}).__repr__()
    assert all(LINE.match(line) for line in ok.text.splitlines())
    assert also.status_code == 200 and "GET /slices" in also.text
    assert bad.status_code == 400 and "invalid seconds='nope'" in bad.text


def test_deep_stacks_keep_their_leaf_under_one_more_frames_marker(
    registry: CollectorRegistry,
) -> None:
    app = profile_app(registry)
    with serve(app) as url:
        asyncio.run(_drive(url, ["/deep"] * 30))
        text = httpx.get(url + "/metrics/profile").text
    deep = by_route(text).get("GET /deep", {})
    assert deep, text
    for stack in deep:
        assert len(stack) <= MAX_DEPTH, len(stack)
    burning = [s for s in deep if s[-1].startswith("burning_function (")]
    assert burning and all(s[0] == MORE_FRAMES for s in burning), burning[:1]


def test_the_store_stays_bounded_however_many_stacks_come() -> None:
    now = [1000.0]
    store = ProfileStore(clock=lambda: now[0])
    for i in range(10 * MAX_STACKS):  # all in one second, all distinct
        store.add((f"GET /r{i % 100}", f"f{i} (a.py:{i})"), 1)
    counts = store.counts(1)
    assert len(counts) <= MAX_STACKS + MAX_OVERFLOW
    assert sum(counts.values()) + store.dropped == 10 * MAX_STACKS
    assert any(stack[1:] == (OTHER_STACKS,) for stack in counts)
    for second in range(KEEP_SECONDS):  # the whole window: distinct stacks every second
        now[0] += 1
        for i in range(MAX_STACKS):
            store.add(("GET /r", f"f (a.py:{second}.{i})"), 1)
        assert len(store._interned) <= MAX_TOTAL + MAX_OVERFLOW
    for _ in range(KEEP_SECONDS + 1):  # the window rolls on: old seconds are let go
        now[0] += 1
        store.add(("GET /r", "f (a.py:1)"), 1)
    assert len(store._buckets) == KEEP_SECONDS
    assert store.counts(KEEP_SECONDS) == {("GET /r", "f (a.py:1)"): KEEP_SECONDS}
    assert list(store._interned) == [("GET /r", "f (a.py:1)")]  # nothing else kept


def test_names_cannot_break_a_line() -> None:
    name = clean("f;g\nh\r\x00 (a;b.py:3)")
    assert ";" not in name and "\n" not in name and "\r" not in name and "\x00" not in name
    assert len(clean("x" * 5000)) == MAX_NAME
    assert clean("x" * 5000 + " (a.py:3)").endswith("(a.py:3)")  # the line is kept
    label = route_label("get", "/a b;c\n" + "y" * 1000)
    assert re.fullmatch(r"GET \S+", label) and len(label) <= MAX_NAME, label
    store = ProfileStore()
    store.add((label, name), 7)
    (line,) = store.collapsed().splitlines()
    assert LINE.match(line) and parse_collapsed(line) == [((label, name), 7)]


def test_flame_graph_svg_is_self_contained_and_escapes_names(
    registry: CollectorRegistry,
) -> None:
    app = profile_app(registry)
    with serve(app) as url:
        path = "/evil%3Cscript%3Ealert(%22x%22)%3C/script%3E'q'/1"
        asyncio.run(_drive(url, ["/slices", path] * 20))
        text = httpx.get(url + "/metrics/profile").text
    routes = by_route(text)
    evil = next((r for r in routes if "<script>" in r), None)
    assert evil == "GET " + EVIL, list(routes)
    svg = flamegraph_svg(parse_collapsed(text), title="loop profile <&>", unit="ms")
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == ns + "svg"
    assert len(root.findall(f"{ns}script")) == 1  # ours, and no other
    names = [g.get("data-n") for g in root.iter(ns + "g") if g.get("class") == "f"]
    assert any(n and n.startswith("burning_function (") for n in names)
    assert "GET " + EVIL in names  # the parsed document has it back as text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;q&#x27;" in svg
    assert "<script>alert" not in svg
    # no external reference of any kind; the namespace is a name, not a fetch
    assert not re.search(r"(?i)(href|src)\s*=|url\(|@import|<image|<foreignObject", svg)
    assert set(re.findall(r"https?://[^\s\"']+", svg)) == {"http://www.w3.org/2000/svg"}
