"""A bad option fails start-up under the servers apps are deployed on, not only uvicorn
(tests/asgi/test_config.py): gunicorn with uvicorn's worker class, hypercorn's asyncio and trio
workers and granian, each a real subprocess on 127.0.0.1 serving the Quickstart app.

What each server does with a ``lifespan.startup.failed`` (found out here, and pinned):

- gunicorn + ``uvicorn_worker.UvicornWorker``: the worker exits with 3 (WORKER_BOOT_ERROR) and
  the master shuts down with 3 instead of booting another worker.
- hypercorn (default one worker process): the worker dies of ``LifespanFailureError`` and the
  master exits, but with status 0: its ``run()`` drops the worker's exit code (hypercorn issue
  269, still open). With ``--workers 0`` (in-process) the status is 1.
- granian ``--interface asgi``: the worker exits, granian logs "Unexpected exit from worker-1"
  and exits with 1 (workers are not respawned by default).
- uvicorn ``--workers 2`` (single-process uvicorn is tests/asgi/test_config.py's): each worker imports
  the app inside its running loop, so even an app wrapped at import fails at the lifespan; the
  supervisor logs "failed to start, stopping the parent process" and exits with status 0.

Slow (a server start each) and not version sensitive: run once, not in every matrix cell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.asgi.test_config import QUICKSTART
from tests.serving import free_port

# The same app wrapped directly at import (``LoopWatchMiddleware(app)``), not by Starlette.
WRAPPED = """
from fastapi import FastAPI
from loopwatch import LoopWatchMiddleware

inner = FastAPI()


@inner.get("/")
async def root() -> dict[str, bool]:
    return {"ok": True}

app = LoopWatchMiddleware(inner)
"""


# server -> its exit status after a failed start-up, or (where its status says nothing, see
# above) the line it logs for a failed lifespan start-up
SERVERS: dict[str, int | str] = {
    "gunicorn": 3,
    "hypercorn-asyncio": "Lifespan failure in startup",
    "hypercorn-asyncio-inprocess": 1,
    "hypercorn-trio": "Lifespan failure in startup",
    "hypercorn-trio-inprocess": 1,
    "granian": 1,
    "uvicorn-workers": "failed to start, stopping the parent process",
}
FAILS_WITHIN = 30.0  # seconds for a server to give up (each takes 1-3 s here)


def command(server: str, port: int, workers: int = 1) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if server == "gunicorn":
        # no control socket: its default path is one per user, shared by concurrent runs
        return [sys.executable, "-m", "gunicorn", "quickstart:app", "--bind", bind,
                "--workers", str(workers), "--worker-class", "uvicorn_worker.UvicornWorker",
                "--no-control-socket"]  # fmt: skip
    if server.startswith("hypercorn-"):
        _, worker, *inprocess = server.split("-")
        return [sys.executable, "-m", "hypercorn", "quickstart:app", "--bind", bind,
                "--worker-class", worker, "--workers", "0" if inprocess else str(workers)]  # fmt: skip
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "quickstart:app"]  # fmt: skip
    if server == "uvicorn-workers":
        return [sys.executable, "-m", "uvicorn", "quickstart:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "2"]  # fmt: skip
    raise AssertionError(server)


@contextlib.contextmanager
def running(
    server: str, app_dir: Path, env: dict[str, str], app: str = QUICKSTART, workers: int = 1
) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """``server`` serving ``app`` (module ``quickstart``) from ``app_dir``, in a process group
    of its own (its workers too), killed whatever happens; yields (URL, process, output)."""
    (app_dir / "quickstart.py").write_text(app)
    port = free_port()
    output = app_dir / f"{server}.log"
    path = os.pathsep.join(p for p in (str(app_dir), os.environ.get("PYTHONPATH")) if p)
    with output.open("wb") as log:
        proc = subprocess.Popen(
            command(server, port, workers),
            cwd=app_dir,
            env={**os.environ, "PYTHONPATH": path, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}", proc, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def bad_option(option: str) -> Iterator[tuple[dict[str, str], str]]:
    """A deploy's environment with one bad option, and what its error must say."""
    if option == "threshold":
        yield (
            {"LOOPWATCH_THRESHOLD": "abc"},
            "invalid threshold='abc' (from environment variable LOOPWATCH_THRESHOLD)",
        )
        return
    with socket.socket() as busy:  # a second worker with a fixed side port, say
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        yield (
            {"LOOPWATCH_METRICS_PORT": str(port)},
            f"invalid metrics_port={port} (from environment variable LOOPWATCH_METRICS_PORT)",
        )


def answers_until_exit(url: str, proc: subprocess.Popen[bytes], within: float) -> list[int]:
    """Polls ``url`` while ``proc`` runs; the statuses of every answer it got. Fails if the
    process is still running after ``within`` seconds."""
    statuses: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=1) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.TransportError):  # not listening (yet)
                    statuses.append(client.get(url + "/").status_code)
                stop.wait(0.05)

    poller = threading.Thread(target=poll, name="poller", daemon=True)
    poller.start()
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {within}s after a failed start-up")
    finally:
        stop.set()
        poller.join(5)
    return statuses


@pytest.mark.parametrize("option", ["threshold", "metrics_port"])
@pytest.mark.parametrize("server", list(SERVERS))
def test_a_bad_option_fails_start_up_and_nothing_is_served(
    tmp_path: Path, server: str, option: str
) -> None:
    with bad_option(option) as (env, named), running(server, tmp_path, env) as (url, proc, out):
        answered = answers_until_exit(url, proc, FAILS_WITHIN)
    output = out.read_text(errors="replace")
    assert answered == [], output  # never served, as if loopwatch were there or with a 500
    assert named in output
    # the failure went the lifespan's way, not "lifespan unsupported, carrying on"
    assert "lifespan' protocol appears unsupported" not in output
    assert "continuing without Lifespan support" not in output
    expected = SERVERS[server]
    if isinstance(expected, str):  # the master's status says nothing: the worker's failure
        assert expected in output, output
    else:
        assert proc.returncode == expected, output


@pytest.mark.parametrize("server", list(SERVERS))
def test_a_bad_option_in_an_app_wrapped_at_import_stops_the_server(
    tmp_path: Path, server: str
) -> None:
    """Raised at import where the server imports outside a loop; at the lifespan start-up
    where it imports inside one (uvicorn's workers)."""
    with (
        bad_option("threshold") as (env, named),
        running(server, tmp_path, env, WRAPPED) as (url, proc, out),
    ):
        answered = answers_until_exit(url, proc, FAILS_WITHIN)
    output = out.read_text(errors="replace")
    assert answered == [], output
    assert named in output
    assert "lifespan' protocol appears unsupported" not in output
    assert "continuing without Lifespan support" not in output
    expected = SERVERS[server]
    if isinstance(expected, int):
        assert proc.returncode == expected, output


@pytest.mark.parametrize("server", list(SERVERS))
def test_with_good_options_the_same_app_serves_and_counts(tmp_path: Path, server: str) -> None:
    side = free_port()
    env = {"LOOPWATCH_THRESHOLD": "0.2", "LOOPWATCH_METRICS_PORT": str(side)}
    if server == "uvicorn-workers":  # several workers share a side port through the files
        (tmp_path / "multiproc").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "multiproc")
    with running(server, tmp_path, env) as (url, proc, out):
        deadline = time.monotonic() + FAILS_WITHIN
        while True:
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, "no answer: " + out.read_text(errors="replace")
            try:
                root = httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert root.status_code == 200
        assert root.json() == {"ok": True}
        # at least once: a poll that timed out while the worker booted may be served too
        counted = 'loopwatch_requests_total{method="GET",route="/",status="200"} '
        for metrics_url in (url + "/metrics", f"http://127.0.0.1:{side}/metrics"):
            # with several workers, the one that served may mirror its figures a second later
            settled = time.monotonic() + 5
            while True:
                metrics = httpx.get(metrics_url, timeout=5)
                assert metrics.status_code == 200, metrics_url
                assert "loopwatch_requests_in_flight" in metrics.text, metrics_url
                if counted in metrics.text or "trio" in server or time.monotonic() > settled:
                    break
                time.sleep(0.2)
            if "trio" in server:  # a loop loopwatch does not watch: passed through, uncounted
                assert counted not in metrics.text
            else:
                assert counted in metrics.text, metrics.text
        proc.terminate()  # the master, as a deploy stops it
        proc.wait(FAILS_WITHIN)
    output = out.read_text(errors="replace")
    assert "Traceback" not in output, output
    if "trio" in server:
        assert "runs on trio, which loopwatch does not watch" in output


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn-workers"])
def test_a_second_worker_on_a_fixed_side_port_stops_the_server(
    tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy the option's error is for: two workers, one fixed side port, no
    ``PROMETHEUS_MULTIPROC_DIR``. The first worker binds it and may serve for a moment (it is
    monitored: answers are not checked); the second fails its start-up and the server stops."""
    port = free_port()
    env = {"LOOPWATCH_METRICS_PORT": str(port)}
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with running(server, tmp_path, env, workers=2) as (url, proc, out):
        answers_until_exit(url, proc, FAILS_WITHIN)
    output = out.read_text(errors="replace")
    assert f"invalid metrics_port={port} (from environment variable LOOPWATCH_METRICS_PORT)" in (
        output
    )
    assert "free to bind" in output
    expected = SERVERS[server]
    if isinstance(expected, str):
        assert expected in output, output
    else:
        assert proc.returncode == expected, output
