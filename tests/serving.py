"""Real uvicorn servers on 127.0.0.1 for the tests: in a thread of this process (so a test can
read the registry and the stall ring directly) or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

LOOPS = ["asyncio", "uvloop"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(app: Any, *, loop: str = "asyncio", lifespan: str = "on", **config: Any) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server in a thread; yields its base URL."""
    if loop == "asyncio":
        # uvicorn < 0.36 sets uvloop's event loop policy process-wide for loop="uvloop" and
        # never resets it: a later "asyncio" server would run on uvloop
        asyncio.set_event_loop_policy(None)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, loop=loop, lifespan=lifespan,
            log_level="warning", **config,
        )
    )  # fmt: skip
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def _server(
    command: list[str],
    port: int,
    env: dict[str, str] | None,
    *,
    group: bool = False,
    cwd: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``command`` (a server on ``port``); yields (base URL, process). Its output goes to
    a file (a pipe nobody reads would fill up and freeze the server): ``proc.output_path``.
    ``group``: in a process group of its own, killed whole at the end (workers too)."""
    with tempfile.NamedTemporaryFile(prefix="server-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            command, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=group, cwd=cwd,
        )  # fmt: skip
    proc.output_path = log.name  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        yield url, proc
    finally:
        stop_process(proc)
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # a worker the master left behind
        os.unlink(log.name)


def serve_process(
    target: str,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    console_script: bool = False,
) -> contextlib.AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``uvicorn target`` as a subprocess (``python -m uvicorn``, or the ``uvicorn``
    console script pip wrote in this interpreter's ``bin``); yields (base URL, process)."""
    port = free_port()
    if console_script:
        command = [os.path.join(sysconfig.get_path("scripts"), "uvicorn")]
    else:
        command = [sys.executable, "-m", "uvicorn"]
    return _server(
        [*command, target, "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", *args],
        port, env,
    )  # fmt: skip


def serve_command(
    command: list[str],
    port: int,
    env: dict[str, str] | None = None,
    *,
    group: bool = True,
    cwd: Path | None = None,
) -> contextlib.AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    """Run any ``command`` that serves on ``port`` (in a process group of its own unless
    ``group=False``, in ``cwd``); yields (base URL, process)."""
    return _server(command, port, env, group=group, cwd=cwd)


def _worker_class() -> str:
    """uvicorn's gunicorn worker: the ``uvicorn-worker`` package's, or, where it does not
    run (uvicorn before 0.30, in the oldest FastAPI matrix cell), uvicorn's own."""
    try:
        import uvicorn_worker  # noqa: F401
    except ImportError:
        return "uvicorn.workers.UvicornWorker"
    return "uvicorn_worker.UvicornWorker"


def serve_gunicorn(
    target: str, *, workers: int = 2, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``gunicorn target`` with uvicorn's worker class as a subprocess, in a process group
    of its own (its workers too, killed whatever happens); yields (base URL, master)."""
    port = free_port()
    return _server(
        [sys.executable, "-m", "gunicorn", target, "--bind", f"127.0.0.1:{port}",
         "--workers", str(workers), "--worker-class", _worker_class(),
         "--no-control-socket", "--graceful-timeout", "5"],
        port, env, group=True,
    )  # fmt: skip


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_output(proc: subprocess.Popen[bytes]) -> str:
    with open(proc.output_path) as f:  # type: ignore[attr-defined]
        return f.read()


def wait_until_up(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server_output(proc)}")
        try:
            httpx.get(url + "/", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")
