"""The pytest plugin, run for real: each test writes a small suite and runs pytest on it in a
subprocess (the plugin is loaded through its ``pytest11`` entry point, as users get it).

Blocking in the inner suites is 0.3-0.4 s against a 0.1 s threshold, so the verdicts do not
depend on the machine's load; no inner test asserts a wall-clock window.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent.parent
INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings = error
{extra}
"""

GUILTY_SUITE = """
import asyncio
import time

import pytest


@pytest.mark.asyncio
async def test_innocent_before():
    await asyncio.sleep(0.3)  # waits without holding the loop


@pytest.mark.asyncio
async def test_guilty():
    time.sleep(0.4)  # GUILTY: holds the loop


def test_sync_innocent():
    time.sleep(0.3)  # no event loop involved


@pytest.mark.anyio
async def test_anyio_innocent():
    import anyio

    await anyio.sleep(0.3)


@pytest.mark.asyncio
async def test_fails_and_blocks():
    time.sleep(0.3)
    assert 1 == 2


@pytest.mark.asyncio
async def test_innocent_after():
    await asyncio.sleep(0.3)
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A clean directory with an ini file; the plugin off unless a test turns it on."""
    for var in ("LOOPWATCH_PYTEST", "LOOPWATCH_THRESHOLD", "LOOPWATCH_INTERVAL"):
        monkeypatch.delenv(var, raising=False)
    # the demo app (demo_app/) is importable by the inner suites
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *sys.path]))
    monkeypatch.setenv("DEMO_WORK_SECONDS", "0.3")
    pytester.makeini(INI.format(extra=""))
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # hypothesis's plugin alone costs a second per run, and no inner suite uses it
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rA", *args, timeout=120
    )


def line_of(source: str, marker: str) -> int:
    """1-based line number of the line containing ``marker`` in ``source`` as written."""
    for number, line in enumerate(source.lstrip("\n").splitlines(), start=1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in the suite")


def outcomes(result: pytest.RunResult) -> dict[str, str]:
    """test name -> PASSED/FAILED/ERROR from the -rA summary."""
    found: dict[str, str] = {}
    for line in result.outlines:
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR") and "::" in rest:
            name = rest.split("::", 1)[1].split(" ", 1)[0]
            found[name] = "FAILED" if word == "ERROR" else word
    return found


def stalls(path: Path) -> list[dict[str, Any]]:
    document = json.loads(path.read_text())
    records: list[dict[str, Any]] = document["stalls"]
    return records


# -- the one guilty test fails; the innocent ones around it do not ----------------------


def test_only_the_guilty_test_fails(suite: pytest.Pytester) -> None:
    path = suite.makepyfile(test_suite=GUILTY_SUITE)
    result = run(suite, "--loopwatch", "--loopwatch-threshold=0.1")
    assert outcomes(result) == {
        "test_innocent_before": "PASSED",
        "test_guilty": "FAILED",
        "test_sync_innocent": "PASSED",
        "test_anyio_innocent[asyncio]": "PASSED",
        "test_anyio_innocent[trio]": "PASSED",  # trio is a test dependency: anyio runs both
        "test_fails_and_blocks": "FAILED",
        "test_innocent_after": "PASSED",
    }
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    culprit = f"{path}:{line_of(GUILTY_SUITE, 'GUILTY')} in test_guilty"
    result.stdout.fnmatch_lines(
        [
            "*_ test_guilty _*",
            "event loop blocked for 0.[3-9]*s (threshold 0.1s) during call",
            # the test's own task, named by its coroutine (no request started it)
            "  route:    <task test_guilty> (a task outside any request seen by LoopWatchMiddleware)",
            f"  culprit:  {culprit}",
            "  kind:     wait (*s of CPU on the loop thread)",
            "  loop:     thread 'MainThread', started during call of test_suite.py::test_guilty",
            "  loop thread stack (innermost last):",
            "*time.sleep(0.4)  # GUILTY: holds the loop",
        ]
    )
    # a test that failed anyway keeps its own error and gains a section about the blocking
    result.stdout.fnmatch_lines(
        ["*assert 1 == 2*", "*- loopwatch: event loop blocked during call -*", "*test_fails_and*"]
    )
    result.stdout.fnmatch_lines(["FAILED test_suite.py::test_guilty - loopwatch: event loop*"])


def test_the_article_endpoints_through_every_kind_of_loop(suite: pytest.Pytester) -> None:
    """The demo app (LoopWatchMiddleware installed) through httpx.ASGITransport on
    pytest-asyncio's and anyio's loops, Starlette's TestClient (its own loop in a thread, with
    and without lifespan), asyncio.run, uvloop, and an app without the middleware; plus a
    fixture that blocks."""
    source = """
import asyncio
import time

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from starlette.testclient import TestClient

from demo_app.main import app

bare = FastAPI()


@bare.get("/bare/{name}")
async def bare_endpoint(name: str):
    time.sleep(0.3)  # BARE
    return {"name": name}


def client():
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test")


@pytest.mark.asyncio
async def test_async_endpoint():
    async with client() as c:
        assert (await c.get("/async")).status_code == 200


@pytest.mark.asyncio
async def test_sync_endpoint_is_fine():
    async with client() as c:
        assert (await c.get("/sync")).status_code == 200
        assert (await c.get("/async-sleep")).status_code == 200


@pytest.mark.anyio
async def test_cpu_endpoint_on_anyio():
    async with client() as c:
        assert (await c.get("/cpu")).status_code == 200


@pytest.fixture
def portal_client():
    with TestClient(app) as c:  # the portal loop starts in this fixture, runs through the test
        yield c


def test_my_route_through_testclient(portal_client):
    assert portal_client.post("/my-route").status_code == 200


def test_testclient_without_lifespan_is_fine():
    assert TestClient(app).post("/my-route-sync").status_code == 200


def test_app_without_middleware():
    assert TestClient(bare).get("/bare/x").status_code == 200


def test_asyncio_run():
    async def main():
        time.sleep(0.3)  # RUN

    asyncio.run(main())


def test_uvloop():
    import uvloop

    async def main():
        time.sleep(0.3)  # UVLOOP

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


@pytest_asyncio.fixture
async def slow_resource():
    time.sleep(0.3)  # FIXTURE
    yield "ready"


@pytest.mark.asyncio
async def test_uses_slow_fixture(slow_resource):
    assert slow_resource == "ready"
"""
    path = suite.makepyfile(test_suite=source)
    report = suite.path / "artefacts" / "loopwatch.json"
    result = run(suite, f"--loopwatch-report={report}", "--loopwatch-threshold=0.1")
    assert outcomes(result) == {
        "test_async_endpoint": "FAILED",
        "test_sync_endpoint_is_fine": "PASSED",
        "test_cpu_endpoint_on_anyio[asyncio]": "FAILED",
        "test_cpu_endpoint_on_anyio[trio]": "PASSED",  # not an asyncio loop: not watched
        "test_my_route_through_testclient": "FAILED",
        "test_testclient_without_lifespan_is_fine": "PASSED",
        "test_app_without_middleware": "FAILED",
        "test_asyncio_run": "FAILED",
        "test_uvloop": "FAILED",
        "test_uses_slow_fixture": "FAILED",
    }
    work = ROOT / "demo_app" / "work.py"
    main = ROOT / "demo_app" / "main.py"
    by_test = {s["test"].split("::")[1]: s for s in stalls(report) if s["verdict"] == "failed"}
    assert sorted(by_test) == sorted(n for n, v in outcomes(result).items() if v == "FAILED")

    async_stall = by_test["test_async_endpoint"]
    assert (async_stall["method"], async_stall["route"]) == ("GET", "/async")
    assert async_stall["culprit"].startswith(f"{main}:")
    assert async_stall["culprit"].endswith(" in async_endpoint")
    assert async_stall["kind"] == "wait"
    assert async_stall["loop_thread"] == "MainThread"
    assert async_stall["phase"] == "call"

    cpu = by_test["test_cpu_endpoint_on_anyio[asyncio]"]
    assert cpu["route"] == "/cpu"
    # the loop thread computed (its share of the 2 cores depends on the machine's load)
    assert cpu["cpu_seconds"] > 0.05 > async_stall["cpu_seconds"]

    portal = by_test["test_my_route_through_testclient"]
    assert (portal["method"], portal["route"]) == ("POST", "/my-route")
    assert portal["culprit"].startswith(f"{work}:") and portal["culprit"].endswith("parse_file")
    assert portal["loop_thread"] != "MainThread"  # Starlette's portal thread
    assert (portal["phase"], portal["fixture"]) == ("call", None)  # the test, not the fixture
    assert "setup of fixture 'portal_client'" in portal["loop_owner"]
    assert "time.sleep(seconds)" in portal["stack"]

    bare = by_test["test_app_without_middleware"]
    # no middleware saw the request: the task TestClient's portal ran it, named by its
    # coroutine (Starlette's, whose name varies by version), never anyio's portal wrapper
    assert bare["method"] == "-" and bare["route"].startswith("<task "), bare
    assert "BlockingPortal" not in bare["route"] and "TaskHandle" not in bare["route"], bare
    assert bare["culprit"] == f"{path}:{line_of(source, '# BARE')} in bare_endpoint"

    assert by_test["test_asyncio_run"]["culprit"].endswith(f":{line_of(source, '# RUN')} in main")
    assert by_test["test_uvloop"]["culprit"].endswith(f":{line_of(source, '# UVLOOP')} in main")

    fixture = by_test["test_uses_slow_fixture"]
    assert (fixture["phase"], fixture["fixture"]) == ("setup", "slow_resource")
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_uses_slow_fixture*",
            "event loop blocked for *s (threshold 0.1s) during setup of fixture "
            "'slow_resource' (function scope)",
        ]
    )
    # every stall of the run is in the report, with nothing charged outside a test
    document = json.loads(report.read_text())
    assert document["summary"]["failed"] == len(by_test)
    assert sorted(document["failed_tests"]) == sorted(s["test"] for s in by_test.values())
    assert all(s["test"] is not None for s in document["stalls"])
    result.stdout.fnmatch_lines([f"report written to {report}"])


FIXTURE_SUITE = """
import asyncio
import time

import pytest
import pytest_asyncio


def block_in_a_loop():
    async def main():
        time.sleep(0.3)

    asyncio.run(main())


@pytest_asyncio.fixture
async def async_teardown():
    yield
    time.sleep(0.3)  # ASYNC TEARDOWN


@pytest.fixture
def inner():
    yield
    block_in_a_loop()


@pytest.fixture
def outer(inner):  # torn down before inner
    yield
    block_in_a_loop()


@pytest.fixture(scope="module")
def per_module():
    block_in_a_loop()
    yield
    block_in_a_loop()


@pytest.mark.asyncio
async def test_async_fixture(async_teardown):
    pass


def test_nested_fixtures(outer):
    pass


def test_module_fixture(per_module):
    pass
"""


def test_fixture_setup_and_teardown_stalls_name_the_fixture(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_suite=FIXTURE_SUITE)
    report = suite.path / "report.json"
    result = run(suite, "--loopwatch", f"--loopwatch-report={report}")
    assert outcomes(result) == {
        "test_async_fixture": "FAILED",
        "test_nested_fixtures": "FAILED",
        "test_module_fixture": "FAILED",
    }
    charged = [(s["test"].split("::")[1], s["phase"], s["fixture"]) for s in stalls(report)]
    assert charged == [
        ("test_async_fixture", "teardown", "async_teardown"),
        ("test_nested_fixtures", "teardown", "outer"),
        ("test_nested_fixtures", "teardown", "inner"),
        ("test_module_fixture", "setup", "per_module"),
        ("test_module_fixture", "teardown", "per_module"),
    ]
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_async_fixture*",
            "event loop blocked for *s (threshold 0.1s) during teardown of fixture "
            "'async_teardown' (function scope)",
            "*culprit:  *test_suite.py:*in async_teardown",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_module_fixture*",
            "event loop blocked for *s (threshold 0.1s) during teardown of fixture "
            "'per_module' (module scope)",
        ]
    )


def test_a_bystander_is_not_blamed_for_another_loop(suite: pytest.Pytester) -> None:
    """A session fixture's loop (in its own thread) blocks while a test runs: the test passes,
    the stall is listed at the end of the run, and the run fails."""
    suite.makepyfile(
        test_suite="""
import asyncio
import threading
import time

import pytest

started = threading.Event()


@pytest.fixture(scope="session")
def background_loop():
    async def main():
        started.set()
        await asyncio.sleep(0.2)
        time.sleep(0.4)  # BACKGROUND
        await asyncio.sleep(0.2)

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="bg-loop")
    thread.start()
    started.wait(5)
    yield
    thread.join(5)


def test_bystander(background_loop):
    time.sleep(1.0)  # the background loop blocks meanwhile


def test_next():
    pass
"""
    )
    report = suite.path / "report.json"
    result = run(suite, "--loopwatch", f"--loopwatch-report={report}")
    assert outcomes(result) == {"test_bystander": "PASSED", "test_next": "PASSED"}
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*blocking in loops not owned by the running test (this fails the run):*",
            "event loop blocked for *s (threshold 0.1s) during no test (see loop)",
            "*culprit:  *test_suite.py:* in main",
            "*loop:     thread 'bg-loop', started during setup of fixture 'background_loop' "
            "(session scope) of test_suite.py::test_bystander",
        ]
    )
    (stall,) = [s for s in stalls(report) if s["verdict"] == "failed"]
    assert stall["test"] is None and stall["loop_thread"] == "bg-loop"


def test_a_phase_end_waits_only_for_loops_the_test_owns(suite: pytest.Pytester) -> None:
    """Stalls in a module-scoped TestClient's loop are never charged to a test, so the end of
    a phase must not wait for that loop's watchdog (it did, for every phase of every test:
    200 trivial tests took 16 s instead of 1.3 s). A function-scoped client's loop is the
    test's own and is still settled."""
    suite.makeconftest(
        """
import pytest
from fastapi import FastAPI

from loopwatch import LoopWatchMiddleware
from loopwatch.monitor import Monitor

app = FastAPI()
app.add_middleware(LoopWatchMiddleware)


@app.get("/")
async def index():
    return {}


waited = []  # the monitors the end of a phase waited on, a watchdog check each
_settle = Monitor.settle


def _counting_settle(self, timeout):
    waited.append(self)
    return _settle(self, timeout)


Monitor.settle = _counting_settle


@pytest.fixture
def guard(request):
    return request.config.pluginmanager.get_plugin("loopwatch-guard")
"""
    )
    suite.makepyfile(
        test_a_module="""
import pytest
from starlette.testclient import TestClient

from conftest import app, waited


@pytest.fixture(scope="module")
def client():
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("n", range(5))
def test_shared_client(client, guard, n):
    assert client.get("/").status_code == 200
    assert waited == []  # no phase so far waited for the module's loop
    assert guard.settling() == []  # nor will the end of this one
""",
        test_b_function="""
import pytest
from starlette.testclient import TestClient

from conftest import app


@pytest.fixture
def client():
    with TestClient(app) as c:
        yield c


def test_own_client(client, guard):
    assert client.get("/").status_code == 200
    (watch,) = guard.settling()  # the test's own portal loop
    assert watch.thread_name != "MainThread"
""",
    )
    result = run(suite, "--loopwatch")
    result.assert_outcomes(passed=6)


UNOWNED_LOOP_SUITE = """
import asyncio
import threading
import time

import pytest


@pytest.fixture(scope="session")
def background_loop():
    loop = {new_loop}
    thread = threading.Thread(target=loop.run_forever, name="bg-loop")
    thread.start()
    while not loop.is_running():
        time.sleep(0.01)
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_bystander(background_loop):
    background_loop.call_soon_threadsafe(time.sleep, 0.4)  # a C function as the callback
    time.sleep(1.0)


@pytest.mark.asyncio
async def test_guilty():
    time.sleep(0.3)


def test_innocent():
    pass
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
@pytest.mark.parametrize(
    "new_loop", ["asyncio.new_event_loop()", "__import__('uvloop').new_event_loop()"],
    ids=["asyncio", "uvloop"],
)  # fmt: skip
def test_blocking_in_an_unowned_loop_fails_the_run(
    suite: pytest.Pytester, new_loop: str, xdist: bool
) -> None:
    """Under pytest-xdist too: each worker sends its stalls to the controller, which lists the
    unowned ones, fails the run and writes them all to its report (there is no FILE.gwN)."""
    suite.makepyfile(test_suite=UNOWNED_LOOP_SUITE.replace("{new_loop}", new_loop))
    report = suite.path / "report.json"
    result = run(suite, "--loopwatch", f"--loopwatch-report={report}", *(["-n", "2"] * xdist))
    assert outcomes(result) == {
        "test_bystander": "PASSED",
        "test_guilty": "FAILED",
        "test_innocent": "PASSED",
    }
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "2 stall(s) past 0.1s: 2 failed, 0 allowed",
            "*blocking in loops not owned by the running test (this fails the run):*",
            "event loop blocked for *s (threshold 0.1s) during no test (see loop)",
            "  culprit:  * (the loop ran a C function as a callback: no Python frame of its own)",
            "*",
            f"  loop:     thread 'bg-loop'{' of xdist worker gw*' * xdist}, started during setup "
            "of fixture 'background_loop' (session scope) of test_suite.py::test_bystander",
        ]
    )
    document = json.loads(report.read_text())
    assert document["summary"] == {
        "stalls": 2,
        "failed": 2,
        "allowed": 0,
        "below-threshold": 0,
        "gc": 0,
    }
    assert document["failed_tests"] == ["test_suite.py::test_guilty"]
    by_test = {s["test"]: s for s in document["stalls"]}
    assert sorted(by_test, key=str) == [None, "test_suite.py::test_guilty"]
    assert by_test[None]["loop_thread"] == "bg-loop"
    assert by_test[None]["duration"] >= 0.3
    workers = {s["worker"] for s in document["stalls"]}
    if xdist:
        assert workers and workers <= {"gw0", "gw1"}
    else:
        assert workers == {None}
    assert sorted(p.name for p in suite.path.glob("report*")) == ["report.json"]


# -- enabling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "ini", "env", "enabled"),
    [
        pytest.param((), "", None, False, id="off-by-default"),
        pytest.param(("--loopwatch",), "", None, True, id="option"),
        pytest.param((), "loopwatch = true", None, True, id="ini"),
        pytest.param((), "", "1", True, id="env"),
        pytest.param((), "loopwatch = true", "0", False, id="env-0-beats-ini"),
        pytest.param(("--loopwatch",), "", "0", True, id="option-beats-env"),
        pytest.param(("--loopwatch-threshold=0.1",), "", None, True, id="threshold-option"),
        pytest.param((), "loopwatch_threshold = 0.1", None, False, id="ini-threshold-only"),
    ],
)
def test_enabling(
    suite: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    ini: str,
    env: str | None,
    enabled: bool,
) -> None:
    suite.makeini(INI.format(extra=ini))
    if env is not None:
        monkeypatch.setenv("LOOPWATCH_PYTEST", env)
    suite.makepyfile(
        test_suite="""
import time
import pytest

@pytest.mark.asyncio
async def test_guilty():
    time.sleep(0.3)
"""
    )
    result = run(suite, *args)
    result.assert_outcomes(failed=1) if enabled else result.assert_outcomes(passed=1)


def test_disabled_plugin_loads_nothing_and_patches_nothing(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_suite="""
import asyncio
import sys
import threading
import time

import pytest


@pytest.mark.loopwatch(allow=True)  # the marker is registered even when disabled
@pytest.mark.asyncio
async def test_blocks_freely():
    time.sleep(0.3)


def test_nothing_was_loaded_or_patched():
    for module in ("loopwatch.monitor", "loopwatch.requests", "prometheus_client"):
        assert module not in sys.modules, module
    assert not getattr(asyncio.BaseEventLoop.run_forever, "__loopwatch__", False)
    assert asyncio.BaseEventLoop.run_forever.__module__ == "asyncio.base_events"
    assert not [t for t in threading.enumerate() if t.name.startswith("loopwatch")]
"""
    )
    result = run(suite, "--strict-markers")
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*loopwatch:*")
    result.stdout.no_fnmatch_line("*- loopwatch -*")


def test_enabled_plugin_leaves_no_thread_behind(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_suite="""
import asyncio
import threading

import pytest


@pytest.mark.asyncio
async def test_runs_a_loop():
    assert any(t.name == "loopwatch-watchdog" for t in threading.enumerate())
    await asyncio.sleep(0.05)


def test_afterwards():
    assert getattr(asyncio.BaseEventLoop.run_forever, "__loopwatch__", False)
    assert not [t for t in threading.enumerate() if t.name == "loopwatch-watchdog"]
"""
    )
    # a high threshold: this test is about threads, not about a loaded machine's hiccups
    result = run(suite, "--loopwatch-threshold=0.5")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "loopwatch: tests fail when they block the event loop for 0.5s or more "
            "(threshold from command line option --loopwatch-threshold)"
        ]
    )
    result.stdout.no_fnmatch_line("*- loopwatch -*")  # no stall, no summary


# -- thresholds and exemptions ----------------------------------------------------------

THRESHOLD_SUITE = """
import time
import pytest

@pytest.mark.asyncio
async def test_under_ini_threshold():
    time.sleep(0.3)

@pytest.mark.loopwatch(threshold=0.1)
@pytest.mark.asyncio
async def test_marker_tighter():
    time.sleep(0.3)

@pytest.mark.loopwatch(threshold=2)
@pytest.mark.asyncio
async def test_marker_looser():
    time.sleep(0.3)
"""


def test_threshold_from_ini_marker_and_option(suite: pytest.Pytester) -> None:
    suite.makeini(INI.format(extra="loopwatch = true\nloopwatch_threshold = 1.0"))
    suite.makepyfile(test_suite=THRESHOLD_SUITE)
    result = run(suite)
    result.stdout.fnmatch_lines(["*for 1s or more (threshold from ini key loopwatch_threshold)"])
    by_ini = outcomes(result)
    assert by_ini == {
        "test_under_ini_threshold": "PASSED",
        "test_marker_tighter": "FAILED",
        "test_marker_looser": "PASSED",
    }
    by_option = outcomes(run(suite, "--loopwatch-threshold=0.1"))  # beats the ini key
    assert by_option == {
        "test_under_ini_threshold": "FAILED",
        "test_marker_tighter": "FAILED",
        "test_marker_looser": "PASSED",  # the marker beats the option
    }


def test_exemptions(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_suite="""
import time

import pytest

from loopwatch.pytest_plugin import allow_blocking


@pytest.mark.loopwatch(allow=True)
@pytest.mark.asyncio
async def test_marked_allowed():
    time.sleep(0.3)


@pytest.mark.asyncio
async def test_block_allowed():
    with allow_blocking():
        time.sleep(0.3)


@pytest.mark.asyncio
async def test_blocking_after_the_allowed_block_still_fails():
    with allow_blocking():
        time.sleep(0.3)
    time.sleep(0.3)  # NOT ALLOWED: the same hold of the loop, outside the block


def test_allowed_block_in_a_testclient_app():
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    app = FastAPI()

    @app.get("/")
    async def endpoint():
        time.sleep(0.3)

    with allow_blocking():
        assert TestClient(app).get("/").status_code == 200
"""
    )
    report = suite.path / "report.json"
    result = run(suite, "--loopwatch", f"--loopwatch-report={report}")
    assert outcomes(result) == {
        "test_marked_allowed": "PASSED",
        "test_block_allowed": "PASSED",
        "test_blocking_after_the_allowed_block_still_fails": "FAILED",
        "test_allowed_block_in_a_testclient_app": "PASSED",
    }
    verdicts = {s["test"].split("::")[1]: s["verdict"] for s in stalls(report)}
    assert verdicts == {
        "test_marked_allowed": "allowed",
        "test_block_allowed": "allowed",
        "test_blocking_after_the_allowed_block_still_fails": "failed",
        "test_allowed_block_in_a_testclient_app": "allowed",
    }
    result.stdout.fnmatch_lines(["4 stall(s) past 0.1s: 1 failed, 3 allowed"])


# -- bad values say where they came from ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "ini", "env", "message"),
    [
        pytest.param(
            ("--loopwatch-threshold=soon",),
            "",
            None,
            "*loopwatch: invalid threshold='soon' (from command line option "
            "--loopwatch-threshold): expected a finite number of seconds above 0*",
            id="option",
        ),
        pytest.param(
            (),
            "loopwatch = true\nloopwatch_threshold = -1",
            None,
            "*loopwatch: invalid threshold='-1' (from ini key loopwatch_threshold): "
            "expected a finite number of seconds above 0*",
            id="ini",
        ),
        pytest.param(
            (),
            "",
            "maybe",
            "*loopwatch: invalid loopwatch='maybe' (from environment variable "
            "LOOPWATCH_PYTEST): expected one of 1/0, true/false, yes/no, on/off*",
            id="env",
        ),
    ],
)
def test_bad_configuration_is_a_usage_error(
    suite: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    ini: str,
    env: str | None,
    message: str,
) -> None:
    suite.makeini(INI.format(extra=ini))
    if env is not None:
        monkeypatch.setenv("LOOPWATCH_PYTEST", env)
    suite.makepyfile(test_suite="def test_nothing():\n    pass\n")
    result = run(suite, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bad_marker_fails_that_test_only(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_suite="""
import pytest

@pytest.mark.loopwatch(threshold="fast")
def test_bad_threshold():
    pass

@pytest.mark.loopwatch(allowed=True)
def test_misspelt_option():
    pass

def test_fine():
    pass
"""
    )
    result = run(suite, "--loopwatch")
    assert outcomes(result) == {
        "test_bad_threshold": "FAILED",
        "test_misspelt_option": "FAILED",
        "test_fine": "PASSED",
    }
    result.stdout.fnmatch_lines(
        [
            "*loopwatch: invalid threshold='fast' (from @pytest.mark.loopwatch on "
            "test_suite.py::test_bad_threshold): expected a finite number of seconds above 0*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*loopwatch: invalid allowed=True (from @pytest.mark.loopwatch on "
            "test_suite.py::test_misspelt_option): expected threshold= or allow=*",
        ]
    )


# -- loop time per test in the JSON report -----------------------------------------------

LOOP_TIME_SUITE = """
import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from loopwatch import LoopWatchMiddleware

app = FastAPI()
app.add_middleware(LoopWatchMiddleware)


@app.get("/slices")
async def slices():
    for _ in range(3):
        time.sleep(0.02)  # 20 ms on the loop: far below the 0.1 s threshold, no stall
        await asyncio.sleep(0)
    return {"ok": True}


@app.get("/fine")
async def fine():
    await asyncio.sleep(0.06)  # waits as long, on no one's loop time
    return {"ok": True}


@pytest.mark.asyncio
async def test_slices():
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/slices")).status_code == 200


def test_slices_through_testclient():
    with TestClient(app) as client:  # its own loop, in a thread
        assert client.get("/slices").status_code == 200


@pytest.mark.asyncio
async def test_innocent():
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/fine")).status_code == 200


def test_no_loop():
    time.sleep(0.06)
"""


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_report_gives_each_tests_loop_time_and_top_route(
    suite: pytest.Pytester, xdist: bool
) -> None:
    """Sub-threshold holds (3 x 20 ms) fail no test, and the report still says which test
    spent the loop's time, on which route."""
    suite.makepyfile(test_suite=LOOP_TIME_SUITE)
    report = suite.path / "report.json"
    result = run(suite, "--loopwatch", f"--loopwatch-report={report}", *(["-n", "2"] * xdist))
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    document = json.loads(report.read_text())
    assert document["summary"]["failed"] == 0  # verdicts unchanged: no hold reached 0.1 s
    tests = document["tests"]
    assert set(tests) == {
        f"test_suite.py::{name}"
        for name in (
            "test_slices",
            "test_slices_through_testclient",
            "test_innocent",
            "test_no_loop",
        )
    }
    for name in ("test_slices", "test_slices_through_testclient"):
        entry = tests[f"test_suite.py::{name}"]
        assert entry["top_route"] == "GET /slices", entry
        assert 0.05 <= entry["top_route_seconds"] <= entry["loop_busy_seconds"], entry
        assert entry["loop_busy_seconds"] < 1.0, entry
    innocent = tests["test_suite.py::test_innocent"]
    assert innocent["top_route"] == "GET /fine", innocent
    assert innocent["loop_busy_seconds"] < 0.03, innocent  # the 60 ms wait is not loop time
    assert tests["test_suite.py::test_no_loop"] == {
        "loop_busy_seconds": 0.0,
        "top_route": None,
        "top_route_seconds": None,
        "routes": {},
    }


# -- kinds: a call that keeps the GIL is caught and named; the GC is reported, not failed ----

KINDS_SUITE = """
import asyncio
import gc
import json
import math
import time

from fastapi import FastAPI
from fastapi.testclient import TestClient
from loopwatch import LoopWatchMiddleware
from prometheus_client import CollectorRegistry


def sized(make, n):
    # the n for which make(n)() takes about 0.4 s on this machine
    for _ in range(20):
        work = make(n)
        began = time.perf_counter()
        work()
        took = time.perf_counter() - began
        if 0.3 <= took <= 0.6:
            return n
        n = n * 4 if took < 0.1 else max(1, int(n * 0.4 / took))
    return n


N = sized(lambda n: lambda: math.factorial(n), 20_000)
TEXT = json.dumps(list(range(sized(lambda n: (lambda t: lambda: json.loads(t))(json.dumps(list(range(n)))), 100_000))))
HEAP = [[i] for i in range(1_000_000)]  # a large heap: each full collection is long

app = FastAPI()


@app.get("/parse")
async def parse():
    items = json.loads(TEXT)  # JSON LINE
    return {"n": len(items)}


app.add_middleware(LoopWatchMiddleware, registry=CollectorRegistry())


def test_factorial_in_asyncio_run():
    async def main():
        await asyncio.sleep(0.1)  # not in the loop's first instant, before its watchdog runs
        digits = math.factorial(N).bit_length()  # FACTORIAL LINE
        await asyncio.sleep(0.05)
        return digits

    asyncio.run(main())


@app.get("/ok")
async def ok():
    return {}


def test_json_through_testclient():
    with TestClient(app) as client:
        client.get("/ok")  # not in the loop's first instant, before its watchdog runs
        time.sleep(0.1)
        assert client.get("/parse").status_code == 200


def test_collector():
    async def main():
        began = time.perf_counter()
        while time.perf_counter() - began < 0.4:
            gc.collect()  # GC LINE
        await asyncio.sleep(0.05)

    asyncio.run(main())
"""


@pytest.mark.parametrize("gc_option", [None, "fail"])
def test_gil_and_gc_holds_under_the_plugin(suite: pytest.Pytester, gc_option: str | None) -> None:
    suite.makepyfile(test_kinds=KINDS_SUITE)
    args = ["--loopwatch", "--loopwatch-threshold", "0.1", "--loopwatch-report", "report.json"]
    if gc_option is not None:
        args.append(f"--loopwatch-gc={gc_option}")
    result = run(suite, *args)
    found = outcomes(result)
    assert found["test_factorial_in_asyncio_run"] == "FAILED"
    assert found["test_json_through_testclient"] == "FAILED"
    # the collector's hold: reported, and failed only when asked
    assert found["test_collector"] == ("FAILED" if gc_option == "fail" else "PASSED")
    records = stalls(suite.path / "report.json")
    by_test = {r["test"].split("::")[-1]: r for r in records if r["test"]}
    factorial = by_test["test_factorial_in_asyncio_run"]
    assert factorial["kind"] == "gil"
    assert factorial["culprit"].endswith(f":{line_of(KINDS_SUITE, 'FACTORIAL LINE')} in main")
    parsed = by_test["test_json_through_testclient"]
    assert (parsed["kind"], parsed["method"], parsed["route"]) == ("gil", "GET", "/parse")
    assert parsed["culprit"].endswith(f":{line_of(KINDS_SUITE, 'JSON LINE')} in parse")
    collected = by_test["test_collector"]
    assert collected["kind"] == "gc" and collected["gc_generation"] == 2
    assert collected["gc_seconds"] >= 0.5 * collected["duration"]
    assert collected["verdict"] == ("failed" if gc_option == "fail" else "gc")
    result.stdout.fnmatch_lines(["*kind:     gil*a thread will not help*"])
    if gc_option is None:
        result.stdout.fnmatch_lines(
            ["*made by the garbage collector (not failed*", "*garbage collection *generation 2*"]
        )


def test_a_bad_gc_verdict_is_a_usage_error(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_suite="def test_nothing():\n    pass\n")
    result = run(suite, "--loopwatch", "--loopwatch-gc=ignore")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*loopwatch: invalid loopwatch-gc='ignore' (from command line option --loopwatch-gc): "
         "expected report or fail*"]
    )  # fmt: skip
