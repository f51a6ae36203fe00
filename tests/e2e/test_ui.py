"""The live page (``loopwatch/ui``, ``loopwatch/live``): served by the side port at ``/`` and by
``metrics_app()`` at ``<mount>/ui``, read-only, tested in a real headless Chromium against a
real uvicorn server whose endpoints really block the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loopwatch import LoopWatchMiddleware, metrics_app
from loopwatch.stats import LAG_BUCKETS
from loopwatch.timeline import quantile
from tests.browser import Watched, chromium, watched_page
from tests.serving import serve

# A route template with markup and both quotes: it must reach the page as text, never as HTML.
NASTY = '/esc/<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">\'{item}'
NASTY_PATH = NASTY.replace("{item}", "1")


def burn_cpu(seconds: float) -> int:
    """The burning function: the page must name it (culprit, flame graph)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def build_app(registry: CollectorRegistry, app_endpoints: str = "all") -> LoopWatchMiddleware:
    app = FastAPI()
    app.mount("/metrics", metrics_app(registry, app_endpoints=app_endpoints))

    @app.get("/cpu")
    async def cpu() -> dict[str, int]:
        return {"n": burn_cpu(0.4)}  # fake async: computes on the loop

    @app.get("/wait")
    async def wait() -> dict[str, str]:
        time.sleep(0.4)  # fake async: sleeps on the loop
        return {}

    @app.get("/freeze")
    async def freeze() -> dict[str, str]:
        time.sleep(1.5)
        return {}

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        await asyncio.sleep(0.005)
        return {}

    block = lambda seconds: time.sleep(seconds)  # noqa: E731  (its culprit is "<lambda>")

    @app.get(NASTY)
    async def nasty(item: str) -> dict[str, str]:
        block(1.2 if item == "long" else 0.4)
        return {}

    return LoopWatchMiddleware(app, registry=registry, metrics_port=0)


@dataclass
class Site:
    app: str  # the app's base URL
    side: str  # the side port's base URL

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.app + path, timeout=30, **kw)

    def in_background(self, path: str) -> threading.Thread:
        thread = threading.Thread(target=self.get, args=(path,), daemon=True)
        thread.start()
        return thread


def _site(loop: str = "asyncio", app_endpoints: str = "all") -> Iterator[Site]:
    watched = build_app(CollectorRegistry(), app_endpoints)
    assert watched.metrics_server is not None
    side = f"http://127.0.0.1:{watched.metrics_server.port}"
    try:
        with serve(watched, loop=loop) as url:
            yield Site(url, side)
    finally:
        watched.close()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    yield from _site()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any) -> Iterator[Watched]:
    with watched_page(browser) as watched:
        yield watched


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def open_live(page: Watched, url: str) -> None:
    page.page.goto(url)
    expect(page.page.locator("#state-word")).to_have_text("RESPONSIVE", timeout=10_000)


def wait_for_stalls(site: Site, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        stalls = httpx.get(site.side + "/ui/stalls.json").json()["stalls"]
        if len(stalls) >= n or time.monotonic() > deadline:
            return list(stalls)
        time.sleep(0.05)


# -- served, read-only, safe headers (no browser) ------------------------------------------


def test_side_port_serves_the_page_at_root_and_nothing_writable(site: Site) -> None:
    page = httpx.get(site.side + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert '<script src="ui/app.js"' in page.text
    for asset, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{site.side}/ui/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert response.headers["x-content-type-options"] == "nosniff"
    head = httpx.head(site.side + "/")
    assert head.status_code == 200 and head.content == b""
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for path in ("/", "/ui/state.json", "/metrics", "/stalls"):
            response = httpx.request(method, site.side + path)
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == "GET, HEAD"
    assert "loopwatch_stall_seconds_total" in httpx.get(site.side + "/metrics").text


def test_metrics_app_serves_the_page_under_its_mount(site: Site) -> None:
    for path in ("/metrics/ui", "/metrics/ui/"):
        assert '<script src="ui/app.js"' in site.get(path).text
    assert site.get("/metrics/ui/app.js").status_code == 200
    state = site.get("/metrics/ui/state.json").json()
    assert state["side_port"] is False and state["loops"] == 1
    side_port = int(site.side.rsplit(":", 1)[1])
    assert httpx.get(site.side + "/ui/state.json").json()["side_port"] == side_port
    assert "loopwatch_stall_seconds_total" in site.get("/metrics").text
    assert httpx.post(site.app + "/metrics/ui").status_code == 405


def test_the_app_port_serves_no_page_unless_metrics_app_is_mounted() -> None:
    # the same exposure rule as /stalls: the middleware alone answers nothing of its own
    app = FastAPI()

    @app.get("/ok")
    async def ok() -> dict[str, str]:
        return {}

    registry = CollectorRegistry()
    app.add_middleware(LoopWatchMiddleware, registry=registry)  # type: ignore[arg-type]
    with serve(app) as url:
        assert httpx.get(url + "/ok").status_code == 200
        for path in (
            "/",
            "/ui",
            "/ui/",
            "/ui/app.js",
            "/ui/state.json",
            "/metrics",
            "/metrics/ui",
            "/metrics/ui/state.json",
            "/stalls",
            "/profile",
        ):
            response = httpx.get(url + path)
            assert response.status_code == 404, path  # the app's own 404, nothing else
            assert "loopwatch" not in response.text, path
    assert registry.get_sample_value(
        "loopwatch_requests_total", {"method": "GET", "route": "/ok", "status": "200"}
    ) == 1.0  # fmt: skip


def test_quantile_interpolates_like_histogram_quantile() -> None:
    counts = [0] * (len(LAG_BUCKETS) + 1)
    assert quantile(0.99, LAG_BUCKETS, counts) == 0.0
    counts[0] = 99  # <= 1 ms
    counts[LAG_BUCKETS.index(2.5)] = 1  # one 1.5 s delay among 100 beats
    assert quantile(0.99, LAG_BUCKETS, counts) == pytest.approx(0.001)
    assert quantile(0.995, LAG_BUCKETS, counts) == pytest.approx(1.0 + 1.5 * 0.5)
    counts[-1] = 100  # above the last bucket: its bound, as Prometheus says
    assert quantile(0.99, LAG_BUCKETS, counts) == LAG_BUCKETS[-1]


def test_timeline_and_routes_record_a_freeze(site: Site) -> None:
    since = time.time()
    site.get("/freeze")
    site.get("/cpu")
    wait_for_stalls(site, 2)
    time.sleep(1.2)  # the second that holds the end of the stall is written
    doc = httpx.get(site.side + "/ui/timeline.json", params={"since": since - 1}).json()
    assert doc["points"], doc
    assert max(p[2] for p in doc["points"]) >= 1.0  # the longest delay: the 1.5 s freeze
    assert max(p[3] for p in doc["points"]) >= 0.5  # utilization of a frozen second
    marks = {(s["method"], s["route"]): s for s in doc["stalls"]}
    assert marks[("GET", "/freeze")]["duration"] == pytest.approx(1.5, abs=0.3)
    assert "in freeze" in marks[("GET", "/freeze")]["culprit"]
    assert "in burn_cpu" in marks[("GET", "/cpu")]["culprit"]
    later = httpx.get(site.side + "/ui/timeline.json", params={"since": time.time() + 5}).json()
    assert later["points"] == []  # only what is new since the page's last point
    rows = {r["route"]: r for r in httpx.get(site.side + "/ui/routes.json").json()["routes"]}
    assert rows["/freeze"]["stalls"] >= 1 and rows["/freeze"]["blocked_seconds"] >= 1.2
    assert rows["/cpu"]["kinds"].get("cpu", 0) >= 1
    assert rows["/freeze"]["loop_share"] > rows["/ok"]["loop_share"] if "/ok" in rows else True


WATCH_BANNER = """() => {
  const seen = () => document.getElementById("state-word").textContent === "BLOCKED"
    && document.getElementById("state-detail").textContent.includes("GET /freeze");
  new MutationObserver(() => { if (!window.__shown && seen()) window.__shown = Date.now(); })
    .observe(document.getElementById("state"), { subtree: true, childList: true, characterData: true });
}"""


# -- in the browser ------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_blocked_with_the_route_within_a_second_of_a_freeze(browser: Any, loop: str) -> None:
    for site in _site(loop):
        with watched_page(browser) as page:
            open_live(page, site.side + "/")
            # the page itself notes when it first shows BLOCKED with the route
            page.page.evaluate(WATCH_BANNER)
            start = time.time()
            freeze = site.in_background("/freeze")
            word = page.page.locator("#state-word")
            expect(word).to_have_text("BLOCKED", timeout=3000)
            detail = page.page.locator("#state-detail")
            expect(detail).to_contain_text("GET /freeze", timeout=1000)
            shown = page.page.evaluate("window.__shown") / 1000 - start
            print(f"\n{loop}: BLOCKED by GET /freeze shown {shown:.3f}s after the request was sent")
            assert shown < 1.0
            # it goes on counting while the loop is frozen, and names the line
            expect(detail).to_contain_text("for 1.", timeout=2000)
            expect(detail).to_contain_text("freeze (", timeout=1000)
            freeze.join(10)
            expect(word).to_have_text("RESPONSIVE", timeout=3000)
            mark = page.page.locator("#timeline .stall-mark title")
            expect(mark.first).to_contain_text("GET /freeze", timeout=3000)
            assert page.errors == []


def test_routes_table_lists_routes_and_culprits_and_sorts(site: Site, page: Watched) -> None:
    for path in ("/cpu", "/cpu", "/wait", "/ok", "/ok", "/ok", "/ok"):
        site.get(path)
    wait_for_stalls(site, 3)
    open_live(page, site.side + "/")
    p = page.page
    cpu = p.locator("#routes tbody tr", has_text="GET /cpu")
    expect(cpu.locator("td.culprit")).to_contain_text("burn_cpu (", timeout=5000)
    expect(cpu.locator("td").nth(6)).to_have_text("cpu")
    wait = p.locator("#routes tbody tr", has_text="GET /wait")
    expect(wait.locator("td.culprit")).to_contain_text("wait (")
    expect(wait.locator("td").nth(6)).to_have_text("wait")

    def column(i: int) -> list[str]:
        return [
            t.strip() for t in p.locator(f"#routes tbody tr td:nth-child({i})").all_text_contents()
        ]

    header = p.locator("#routes th[data-key=requests]")
    header.click()
    expect(header).to_have_attribute("aria-sort", "descending")
    counts = [int(n) for n in column(2)]
    assert counts == sorted(counts, reverse=True) and counts[0] >= 4
    assert column(1)[0] == "GET /ok"
    header.click()
    expect(header).to_have_attribute("aria-sort", "ascending")
    counts = [int(n) for n in column(2)]
    assert counts == sorted(counts)
    p.locator("#routes th[data-key=route]").click()
    names = column(1)
    assert names == sorted(names, key=str.lower) or names == sorted(names)
    p.locator("#routes th[data-key=stalls]").click()
    stalls = [int(n) for n in column(3)]
    assert stalls == sorted(stalls, reverse=True) and stalls[0] >= 2
    # recent stalls: newest first, the stack opens on click
    first = p.locator("#stalls li details").first
    expect(first.locator("summary")).to_contain_text("GET /wait")
    first.locator("summary").click()
    expect(first.locator("pre")).to_contain_text('File "')
    assert page.errors == []


def test_a_summary_mount_shows_routes_and_stalls_but_no_code_location(browser: Any) -> None:
    for site in _site(app_endpoints="summary"):
        site.get("/wait")
        # the /wait stall (a full collection of this big test process may make one of its own)
        deadline = time.monotonic() + 10
        while not (mine := [s for s in wait_for_stalls(site, 1) if s["route"] == "/wait"]):
            assert time.monotonic() < deadline, "no /wait stall"
            time.sleep(0.05)
        [stall] = mine
        culprit = stall["culprit"]  # the side port names it: "path:line in wait"
        assert culprit.startswith(__file__) and culprit.endswith(" in wait")
        with watched_page(browser) as page:
            open_live(page, site.app + "/metrics/ui")
            p = page.page
            row = p.locator("#routes tbody tr", has_text="GET /wait")
            expect(row.locator("td").nth(6)).to_have_text("wait", timeout=5000)
            expect(row.locator("td.culprit")).to_have_text("")
            mine = p.locator("#stalls li details", has_text="GET /wait").first
            expect(mine.locator("summary")).to_contain_text("GET /wait (wait) ·")
            mine.locator("summary").click()
            expect(mine.locator("pre")).to_contain_text("not served on this mount")
            marks = p.locator("#timeline .stall-mark title", has_text="GET /wait")
            expect(marks.first).to_contain_text("GET /wait")
            expect(p.locator("#profile-note")).to_contain_text("app_endpoints='summary'")
            shown = p.content()  # the whole DOM: text, titles, attributes
            for location in (culprit, culprit.rsplit(" in ", 1)[0], __file__, ".py", 'File "'):
                assert location not in shown, location
            assert not [url for url in page.requests if "/profile" in url]
            assert page.errors == []


def test_route_names_are_text_never_markup(site: Site, page: Watched) -> None:
    freeze = site.in_background(NASTY_PATH)
    open_live(page, site.side + "/")
    p = page.page
    label = "GET " + NASTY
    freeze.join(10)
    wait_for_stalls(site, 1)
    row = p.locator("#routes tbody tr td.route", has_text="/esc/")
    expect(row).to_have_text(label, timeout=5000)
    expect(p.locator("#routes tbody tr", has_text="/esc/").locator("td.culprit")).to_contain_text(
        "<lambda> ("
    )
    expect(p.locator("#stalls summary").first).to_contain_text(label)
    expect(p.locator("#timeline .stall-mark title").first).to_contain_text(label)
    # while it blocks, the banner names it too
    freeze = site.in_background(NASTY.replace("{item}", "long"))
    expect(p.locator("#state-detail")).to_contain_text(label, timeout=3000)
    freeze.join(10)
    assert p.locator("script").count() == 1  # app.js only
    assert p.locator("img").count() == 0
    assert p.evaluate("typeof window.__pwned") == "undefined"
    assert page.errors == []


def test_offline_and_no_console_errors(site: Site, page: Watched) -> None:
    site.get("/cpu")
    wait_for_stalls(site, 1)
    open_live(page, site.side + "/")
    p = page.page
    expect(p.locator("#stalls li")).to_have_count(1, timeout=5000)
    p.locator("#span").select_option("60")
    p.set_viewport_size({"width": 800, "height": 900})
    p.locator("#routes th[data-key=culprit]").click()
    time.sleep(2.5)  # a few rounds of polling
    assert page.errors == []
    assert page.foreign_requests(site.side) == []
    assert any(u.endswith("/ui/timeline.json?since=0") for u in page.requests)


def test_in_app_page_says_it_cannot_update_during_a_freeze(site: Site, page: Watched) -> None:
    open_live(page, site.app + "/metrics/ui")
    note = page.page.locator("#where")
    expect(note).to_be_visible()
    expect(note).to_contain_text("cannot update while the loop is frozen")
    expect(note).to_contain_text("side port")
    assert page.foreign_requests(site.app) == []
    assert page.errors == []


def _collapsed() -> str:
    """Collapsed stacks as ``/profile`` writes them (the format is fixed)."""
    lines = [
        "GET /cpu;cpu (/srv/app.py:40);burn_cpu (/srv/app.py:31) 380",
        "GET /cpu;cpu (/srv/app.py:40);json_dumps (/srv/app.py:12) 20",
        "GET /ok;ok (/srv/app.py:60) 4",
        f"GET {NASTY};nasty (/srv/<app>.py:70);<lambda> (/srv/app.py:66) 96",
        "- <server>;_read_ready (/usr/lib/asyncio/selector_events.py:1) 2",
    ]
    return "\n".join(lines) + "\n"


def test_flame_graph_renders_collapsed_stacks_filters_and_zooms(site: Site, page: Watched) -> None:
    p = page.page
    # this text whatever the server's own profile holds (the page polls /profile once it can)
    p.route(
        "**/profile?*", lambda route: route.fulfill(body=_collapsed(), content_type="text/plain")
    )
    open_live(page, site.side + "/")
    p.evaluate("text => onProfile(text)", _collapsed())
    frames = p.locator("#flame g.frame")
    burn = frames.filter(has=p.locator("title", has_text="burn_cpu (/srv/app.py:31)"))
    expect(burn).to_have_count(1)
    expect(burn.locator("title")).to_contain_text("380 ms of loop time, 75.7%")
    width = float(p.locator("#flame").evaluate("e => e.clientWidth"))
    assert float(burn.locator("rect").get_attribute("width") or 0) > 0.7 * width
    nasty = frames.filter(has=p.locator("title", has_text="GET " + NASTY))
    expect(nasty).to_have_count(1)  # the route frame, as text
    assert p.locator("#flame image, #flame foreignObject, script").count() == 1
    # filter by route: only that route's frames
    p.locator("#profile-route").select_option("GET /ok")
    expect(burn).to_have_count(0)
    expect(frames.filter(has=p.locator("title", has_text="ok (/srv/app.py:60)"))).to_have_count(1)
    p.locator("#profile-route").select_option("")
    # click to zoom: the frame spans the whole width, its siblings are gone
    frames.filter(has=p.locator("title", has_text="json_dumps")).click()
    zoomed = frames.filter(has=p.locator("title", has_text="json_dumps"))
    assert float(zoomed.locator("rect").get_attribute("width") or 0) > 0.95 * width
    expect(burn).to_have_count(0)
    p.locator("#profile-reset").click()
    expect(burn).to_have_count(1)
    p.locator("#profile-search").fill("burn")
    expect(p.locator("#flame g.frame.match")).to_have_count(1)
    assert page.errors == []


def test_flame_graph_shows_the_burning_function_from_the_real_profile(
    site: Site, page: Watched
) -> None:
    pytest.importorskip("loopwatch.profile", reason="the loop profile (/profile) is not merged")
    for _ in range(4):
        site.get("/cpu")
    open_live(page, site.side + "/")
    p = page.page
    burn = p.locator("#flame g.frame").filter(has=p.locator("title", has_text="burn_cpu ("))
    expect(burn.first).to_be_visible(timeout=8000)
    p.locator("#profile-route").select_option("GET /cpu")
    expect(burn.first).to_be_visible()
    assert page.errors == []


# -- long and odd names ----------------------------------------------------------------------

SCRIPTED = "/<script>alert(1)</script>/{item}"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_long_and_odd_route_names_are_cut_on_the_page_and_never_run(
    browser: Any, loop: str
) -> None:
    """A 5,000-character route and one with a newline and terminal escapes: one line each,
    cut with an ellipsis, the whole name in the title, and the culprit column keeps its
    width; a route with a script tag is text."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from tests.servers.test_names import LONG, LONG_LABEL, LONG_PATH, ODD, ODD_LABEL, ODD_PATH

    def hold_the_loop(seconds: float) -> None:
        time.sleep(seconds)

    async def endpoint(request: Request) -> PlainTextResponse:
        hold_the_loop(2.0 if request.path_params["item"] == "long" else 0.4)
        return PlainTextResponse("done")

    app = Starlette(routes=[Route(t, endpoint) for t in (LONG, ODD, SCRIPTED)])
    watched = LoopWatchMiddleware(app, registry=CollectorRegistry(), metrics_port=0)
    assert watched.metrics_server is not None
    side = f"http://127.0.0.1:{watched.metrics_server.port}"
    try:
        with serve(watched, loop=loop) as url, watched_page(browser) as page:
            dialogs: list[str] = []
            page.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            for path in (LONG_PATH, ODD_PATH, SCRIPTED.replace("{item}", "1")):
                assert httpx.get(url + path, timeout=30).text == "done"
            open_live(page, side + "/")
            p = page.page
            rows = p.locator("#routes tbody tr")
            for label in (LONG_LABEL, ODD_LABEL, SCRIPTED):
                row = rows.filter(has=p.get_by_title("GET " + label, exact=True))
                expect(row).to_have_count(1, timeout=5000)
                name = row.locator("td.route .cut")
                assert name.text_content() == "GET " + label  # one line: escaped, as text
                expect(row.locator("td.culprit")).to_contain_text("hold_the_loop (")
                culprit = row.locator("td.culprit").bounding_box()
                route = row.locator("td.route").bounding_box()
                assert culprit is not None and route is not None
                assert culprit["width"] >= 200, (label, culprit)  # never squeezed
                assert route["width"] <= 420, (label, route)  # 30em of 12px and padding
                one_line = name.bounding_box()
                assert one_line is not None and one_line["height"] < 25, (label, one_line)
            long_name = p.locator("#routes td.route .cut", has_text="/long/")
            assert long_name.evaluate("e => e.scrollWidth > e.clientWidth")  # the ellipsis
            # the banner while it blocks, and the recent stalls: cut, the title whole
            held = threading.Thread(
                target=httpx.get, args=(url + LONG_PATH.replace("/1", "/long"),),
                kwargs={"timeout": 30}, daemon=True,
            )  # fmt: skip
            held.start()
            banner = p.locator("#state-detail code.cut").first
            expect(banner).to_have_attribute("title", "GET " + LONG_LABEL, timeout=3000)
            width = p.locator("#state-detail").evaluate(
                "e => e.querySelector('code.cut').getBoundingClientRect().width"
            )  # (redrawn every 200 ms: read in one go)
            assert 100 < width <= 40 * 14 + 2  # 40em of the banner's 14px code
            held.join(30)
            summary = p.locator("#stalls summary code.cut").first
            expect(summary).to_have_attribute("title", "GET " + LONG_LABEL, timeout=5000)
            assert p.locator("script").count() == 1  # app.js only
            assert dialogs == [] and page.errors == []
    finally:
        watched.close()


def test_one_row_per_loop_and_the_frozen_workers_row_names_route_and_line(
    browser: Any, site: Site, tmp_path: Path
) -> None:
    from tests.fleet import gunicorn_fleet

    with watched_page(browser) as page:  # one loop, one row
        open_live(page, site.side + "/")
        expect(page.page.locator("#loops tbody tr")).to_have_count(1)
        expect(page.page.locator("#loops tbody tr td.word")).to_have_text("RESPONSIVE")
    with gunicorn_fleet(tmp_path) as (fleet, _), watched_page(browser) as page:
        serving = fleet.state()["pid"]
        (other,) = fleet.pids() - {serving}
        open_live(page, fleet.side + "/")
        rows = page.page.locator("#loops tbody tr")
        expect(rows).to_have_count(2)
        expect(page.page.locator("#state-facts")).to_contain_text("2 workers")
        done = fleet.freeze(other, 3.0)
        row = page.page.locator(f'#loops tbody tr[data-pid="{other}"]')
        expect(row.locator("td.word")).to_have_text("BLOCKED", timeout=3000)
        expect(row.locator("td.route")).to_have_text("GET /freeze/{pid}", timeout=1000)
        expect(row.locator("td.culprit")).to_contain_text("hold_the_loop (", timeout=2000)
        calm = page.page.locator(f'#loops tbody tr[data-pid="{serving}"] td.word')
        expect(calm).to_have_text("RESPONSIVE")
        expect(page.page.locator("#state-word")).to_have_text("BLOCKED")
        expect(page.page.locator("#state-detail")).to_contain_text(f"in pid {other}")
        done.join(30)
        expect(row.locator("td.word")).to_have_text("RESPONSIVE", timeout=5000)
        expect(rows).to_have_count(2)
        assert page.errors == []
