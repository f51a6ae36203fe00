"""``loopwatch run -- COMMAND``: an app that knows nothing of loopwatch (tests/runner_app.py),
served unmodified by a real server in a subprocess, shows its blocking route by its template in
every view of the side port (``/metrics``, ``/stalls``, the page's data) and in ``loopwatch
report``, with the innocent route blamed for nothing. Bad input fails before anything runs."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import by_route, eventually, text_samples
from tests.serving import LOOPS, free_port, serve_command, server_output

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "loopwatch", "run"]
BLOCK = "/items/{item_id}/block"
# this interpreter's scripts first: COMMAND (uvicorn, gunicorn, python) is this venv's
ENV = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def _exercise(url: str, side: str, block: str = BLOCK, ok: str = "/ok") -> None:
    """Two blocking requests, each with an innocent one in flight beside it."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for item in (1, 2):
            blocked = pool.submit(httpx.get, f"{url}/items/{item}/block", timeout=10)
            innocent = pool.submit(httpx.get, f"{url}/ok", timeout=10)
            assert blocked.result().status_code == 200
            assert innocent.result().status_code == 200
    for _ in range(3):
        assert httpx.get(f"{url}/ok", timeout=10).status_code == 200

    def seen() -> bool:
        text = httpx.get(f"{side}/metrics", timeout=5).text
        counted = by_route(text_samples(text, "loopwatch_requests_total"))
        return (
            sum(text_samples(text, "loopwatch_stalls_total").values()) >= 2
            and counted.get(ok, 0) >= 5
            and counted.get(block, 0) >= 2
        )

    # with several workers, each mirrors its figures for the side port about once a second
    eventually(seen, timeout=15, what="two stalls and the seven requests on the side port")


def _assert_views(
    side: str, block: str = BLOCK, module: str = "runner_app.py", ok: str = "/ok"
) -> None:
    text = httpx.get(f"{side}/metrics", timeout=5).text
    blamed = by_route(text_samples(text, "loopwatch_stalls_total"))
    assert blamed.get(block, 0) >= 2, blamed
    assert ok not in blamed, blamed
    assert all("/items/1" not in route and "/items/2" not in route for route in blamed)
    counted = by_route(text_samples(text, "loopwatch_requests_total"))
    assert counted.get(ok) == 5 and counted.get(block) == 2, counted  # each once
    ring = httpx.get(f"{side}/stalls", timeout=5).json()
    assert {s["route"] for s in ring} == {block}, ring
    assert all(module in (s["culprit"] or "") for s in ring), ring
    # the page's stalls cover every worker (its routes table is the serving worker's own)
    page = httpx.get(f"{side}/ui/stalls.json", timeout=5).text
    assert block in page and "/ok" not in page, page
    report = subprocess.run(
        [sys.executable, "-m", "loopwatch", "report", side, "--plain"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert block in report.stdout, report.stdout


def _served_unmodified(
    server: list[str],
    port: int,
    *,
    block: str = BLOCK,
    module: str = "runner_app.py",
    ok: str = "/ok",
) -> str:
    """``loopwatch run -- *server`` (serving on ``port``): exercised, and every view checked;
    returns the server's output."""
    side = free_port()
    with serve_command([*RUN, "--metrics-port", str(side), "--", *server], port, ENV) as (
        url,
        proc,
    ):
        _exercise(url, f"http://127.0.0.1:{side}", block, ok)
        _assert_views(f"http://127.0.0.1:{side}", block, module, ok)
        output = server_output(proc)
    assert "loopwatch: not attached" not in output, output
    return output


@pytest.mark.parametrize("loop", LOOPS)
def test_uvicorn_serves_an_unmodified_app_and_every_view_names_the_blocking_route(
    loop: str,
) -> None:
    port = free_port()
    _served_unmodified(["uvicorn", "tests.runner_app:app", "--host", "127.0.0.1", "--port",
                        str(port), "--loop", loop, "--log-level", "warning"], port)  # fmt: skip


def test_a_script_that_calls_uvicorn_run() -> None:
    port = free_port()
    _served_unmodified(["python", str(ROOT / "tests" / "runner_app.py"), str(port), "uvloop"], port)


def test_uvicorn_with_several_workers() -> None:
    """Every worker is attached; the one that binds the side port serves all their figures."""
    port, side = free_port(), free_port()
    command = [*RUN, "--metrics-port", str(side), "--", "uvicorn", "tests.runner_app:app",
               "--port", str(port), "--workers", "2", "--log-level", "warning"]  # fmt: skip
    with serve_command(command, port, ENV) as (url, proc):
        _exercise(url, f"http://127.0.0.1:{side}")
        _assert_views(f"http://127.0.0.1:{side}")
        loops = text_samples(
            httpx.get(f"http://127.0.0.1:{side}/metrics", timeout=5).text, "loopwatch_event_loops"
        )
        assert sum(loops.values()) == 2, loops
        assert "loopwatch: not attached" not in server_output(proc)


@pytest.mark.parametrize("workers", [1, 2])
def test_gunicorn_with_uvicorn_workers(workers: int) -> None:
    from tests.serving import _worker_class

    port = free_port()
    _served_unmodified(["gunicorn", "tests.runner_app:app", "--bind", f"127.0.0.1:{port}",
                        "--workers", str(workers), "--worker-class", _worker_class(),
                        "--no-control-socket"], port)  # fmt: skip


def test_an_app_that_has_the_middleware_already_is_not_wrapped_twice(tmp_path: Path) -> None:
    (tmp_path / "wrapped.py").write_text(
        "from fastapi import FastAPI\n"
        "from loopwatch import LoopWatchMiddleware\n"
        "app = FastAPI()\n"
        "app.add_middleware(LoopWatchMiddleware)\n"
        "@app.get('/ok')\n"
        "async def ok():\n"
        "    return {}\n"
    )
    port, side = free_port(), free_port()
    command = [*RUN, "--metrics-port", str(side), "--", "uvicorn", "wrapped:app",
               "--app-dir", str(tmp_path), "--port", str(port)]  # fmt: skip
    with serve_command(command, port, ENV) as (url, _):
        for _ in range(3):
            assert httpx.get(f"{url}/ok", timeout=10).status_code == 200
        requests = text_samples(
            httpx.get(f"http://127.0.0.1:{side}/metrics", timeout=5).text,
            "loopwatch_requests_total",
        )
        assert by_route(requests).get("/ok") == 3  # once each: one middleware, not two


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUN, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, **ENV, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--threshold", "soon", "--", "python", "-c", "pass"), {},
         "invalid --threshold 'soon': expected a number of seconds"),
        (("--metrics-port", "70000", "--", "python", "-c", "pass"), {},
         "invalid --metrics-port 70000: expected an integer port"),
        (("--", "python", "-c", "pass"), {"LOOPWATCH_INTERVAL": "1"},
         "invalid interval=1.0 (from environment variable LOOPWATCH_INTERVAL)"),
        (("--",), {}, "no COMMAND given"),
        (("--", "no-such-server-anywhere", "app:app"), {},
         "COMMAND 'no-such-server-anywhere': not found"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_anything_runs(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    result = _run(*args, env=env)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_a_missing_app_fails_with_the_servers_error() -> None:
    result = _run("--metrics-port", str(free_port()), "--", "uvicorn", "tests.no_such_module:app",
                  "--port", str(free_port()))  # fmt: skip
    assert result.returncode != 0
    assert "no_such_module" in result.stderr + result.stdout


def test_a_busy_metrics_port_fails_the_servers_start_up() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = _run("--metrics-port", str(taken), "--", "uvicorn", "tests.runner_app:app",
                      "--port", str(free_port()))  # fmt: skip
    assert "invalid metrics_port" in result.stderr + result.stdout, result.stderr
    assert "Application startup failed" in result.stderr + result.stdout


def test_the_programs_own_sitecustomize_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import os\nos.environ['HIDDEN_SITECUSTOMIZE_RAN'] = 'yes'\n"
    )
    result = _run(
        "--", "python", "-c",
        "import os, sys; print(os.environ.get('HIDDEN_SITECUSTOMIZE_RAN'), "
        "any(type(f).__name__ == '_Finder' for f in sys.meta_path), "
        "'loopwatch.middleware' in sys.modules)",
        env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # the hidden one ran; loopwatch's finder is in place, and nothing of loopwatch loaded
    assert result.stdout.split() == ["yes", "True", "False"], result.stdout + result.stderr


def test_help_shows_an_example_for_each_way_of_serving() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for example in ("-- uvicorn app:app", "-- python service.py", "-- gunicorn", "-- hypercorn",
                    "-- granian"):  # fmt: skip
        assert example in result.stdout, result.stdout


def test_a_server_imported_before_the_bootstrap_is_attached_too(tmp_path: Path) -> None:
    """A server the program's own sitecustomize imported (before loopwatch's finder was in
    place) is attached to at once, and once."""
    (tmp_path / "sitecustomize.py").write_text("import uvicorn.config\n")
    code = (
        "import sys, uvicorn.config\n"
        "assert 'loopwatch.attach' in sys.modules\n"
        "async def app(scope, receive, send): pass\n"
        "config = uvicorn.config.Config(app, lifespan='off')\n"
        "config.load()\n"
        "print(type(config.loaded_app).__name__, type(config.loaded_app.app).__name__)\n"
    )
    result = _run(
        "--metrics-port", "none", "--", "python", "-c", code,
        env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # uvicorn's own wrapper of a plain function is inside ours, and ours is there once
    assert result.stdout.split()[0] == "LoopWatchMiddleware", result.stdout
    assert result.stdout.split()[1] != "LoopWatchMiddleware", result.stdout


def test_the_bootstrap_watches_what_attach_patches() -> None:
    import ast

    from loopwatch.attach import PATCHED_MODULES
    from loopwatch.cli.run import BOOTSTRAP

    tree = ast.parse((BOOTSTRAP / "sitecustomize.py").read_text())
    (watched,) = [
        node.value for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "WATCHED"
    ]  # fmt: skip
    assert isinstance(watched, ast.Call)
    assert ast.literal_eval(watched.args[0]) == set(PATCHED_MODULES)


def test_a_program_that_imports_no_server_loads_nothing_of_loopwatch() -> None:
    """The bootstrap alone: ``python -c`` pays for one small file, not for loopwatch."""
    result = _run(
        "--", "python", "-c",
        "import sys; print(sorted(m for m in sys.modules if m.startswith(('loopwatch', 'typing', 'logging'))))",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_watched_finds_the_middleware_however_it_was_added() -> None:
    from fastapi import FastAPI

    from loopwatch import LoopWatchMiddleware
    from loopwatch.attach import watched

    plain = FastAPI()
    added = FastAPI()
    added.add_middleware(LoopWatchMiddleware)

    class Outer:
        def __init__(self, app: object) -> None:
            self.app = app

    assert not watched(plain)
    assert not watched(Outer(plain))
    assert watched(added)
    assert watched(Outer(Outer(added)))
    assert watched(Outer(LoopWatchMiddleware(plain, metrics_port=None)))


@pytest.mark.parametrize(("worker", "workers"), [("asyncio", 2), ("uvloop", 1)])
def test_hypercorn(worker: str, workers: int) -> None:
    port = free_port()
    _served_unmodified(["hypercorn", "tests.runner_app:app", "--bind", f"127.0.0.1:{port}",
                        "--worker-class", worker, "--workers", str(workers)], port)  # fmt: skip


@pytest.mark.parametrize("loop", LOOPS)
def test_granian(loop: str) -> None:
    port = free_port()
    _served_unmodified(["granian", "--interface", "asgi", "--host", "127.0.0.1", "--port",
                        str(port), "--workers", "2", "--loop", loop,
                        "tests.runner_app:app"], port)  # fmt: skip


def test_a_litestar_app() -> None:
    pytest.importorskip("litestar", reason="not in the oldest-FastAPI matrix cell (pydantic)")
    port = free_port()
    _served_unmodified(["uvicorn", "tests.litestar_app:app", "--port", str(port), "--loop",
                        "uvloop", "--log-level", "warning"], port,
                       block="/items/{item_id:int}/block", module="litestar_app.py")  # fmt: skip


def test_a_django_project() -> None:
    """Django's ASGI handler under uvicorn (lifespan auto: Django refuses it, and is served)."""
    port = free_port()
    output = _served_unmodified(
        ["uvicorn", "tests.django_app:application", "--port", str(port), "--log-level",
         "warning"], port, block="items/<int:item_id>/block", module="django_app.py", ok="ok",
    )  # fmt: skip
    assert "Traceback" not in output, output


def test_a_quart_app_under_hypercorn() -> None:
    """Quart's own server."""
    port = free_port()
    _served_unmodified(["hypercorn", "tests.quart_app:app", "--bind", f"127.0.0.1:{port}"],
                       port, block="/items/<int:item_id>/block", module="quart_app.py")  # fmt: skip


def test_an_aiohttp_service() -> None:
    """Not ASGI: ``web.run_app`` in a script, its app given loopwatch's aiohttp middleware."""
    port = free_port()
    _served_unmodified(["python", str(ROOT / "tests" / "aiohttp_app.py"), str(port)], port,
                       block="/items/{item_id}/block", module="aiohttp_app.py")  # fmt: skip


def _plain_service(command: list[str], side: int, env: dict[str, str]) -> None:
    """Its stalls and loop time are its tasks', named by their coroutines: ``<task consume>``
    blocks, ``<task produce>`` does not; nothing is left to ``<background>``."""
    with serve_command(command, side, {**ENV, **env}) as (url, proc):  # the side port's page

        def consume_stalls() -> float:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            return by_route(text_samples(text, "loopwatch_stalls_total")).get("<task consume>", 0)

        eventually(lambda: consume_stalls() >= 2, timeout=15, what="two stalls")
        time.sleep(0.5)  # the accountant's next drain
        ring = httpx.get(f"{url}/stalls", timeout=5).json()
        text = httpx.get(f"{url}/metrics", timeout=5).text
        profile = httpx.get(f"{url}/profile?seconds=60", timeout=10).text
        output = server_output(proc)
    assert {s["route"] for s in ring} == {"<task consume>"}, ring
    assert all("plain_service.py" in s["culprit"] and s["kind"] == "wait" for s in ring), ring
    assert all(s["duration"] == pytest.approx(0.3, abs=0.15) for s in ring), ring
    stalls = by_route(text_samples(text, "loopwatch_stalls_total"))
    assert {route for route, n in stalls.items() if n} == {"<task consume>"}, stalls
    # loop time: the blocking task's, at least its stalls' seconds; the producer's, a little
    busy = by_route(text_samples(text, "loopwatch_event_loop_busy_seconds_total"))
    blocked = sum(s["duration"] for s in ring)
    assert busy.get("<task consume>", 0) >= 0.8 * blocked, busy
    assert 0 < busy.get("<task produce>", 0) < 0.1 * busy["<task consume>"], busy
    assert busy.get("<background>", 0) < 0.05 * busy["<task consume>"], busy
    # the profile (the loop thread's CPU: a sleep takes little) names the same tasks, in its
    # one-word form (a space separates the count), and leaves nothing to <background>
    weights: dict[str, int] = {}
    for line in profile.splitlines():
        stack, _, count = line.rpartition(" ")
        route = stack.split(";", 1)[0]
        weights[route] = weights.get(route, 0) + int(count)
    tasks = weights.get("- <task_consume>", 0) + weights.get("- <task_produce>", 0)
    assert tasks > 0 and weights.get("- <background>", 0) <= 0.1 * tasks, weights
    assert "loopwatch: could not watch" not in output


def test_a_plain_asyncio_program_under_the_runner() -> None:
    side = free_port()
    command = [*RUN, "--metrics-port", str(side), "--", "python",
               str(ROOT / "tests" / "plain_service.py")]  # fmt: skip
    _plain_service(command, side, {})


def test_a_plain_asyncio_program_that_calls_watch() -> None:
    side = free_port()
    command = [sys.executable, str(ROOT / "tests" / "plain_service.py")]
    _plain_service(command, side, {"LOOPWATCH_DEMO_WATCH": "1",
                                   "LOOPWATCH_METRICS_PORT": str(side)})  # fmt: skip
