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
def serve_process(
    target: str,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    console_script: bool = False,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``uvicorn target`` as a subprocess (``python -m uvicorn``, or the ``uvicorn``
    console script pip wrote in this interpreter's ``bin``); yields (base URL, process). Its
    output goes to a file (a pipe nobody reads would fill up and freeze the server);
    ``proc.output_path``."""
    port = free_port()
    if console_script:
        command = [os.path.join(sysconfig.get_path("scripts"), "uvicorn")]
    else:
        command = [sys.executable, "-m", "uvicorn"]
    with tempfile.NamedTemporaryFile(prefix="uvicorn-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [*command, target, "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning", *args],
            env={**os.environ, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    proc.output_path = log.name  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        yield url, proc
    finally:
        stop_process(proc)
        os.unlink(log.name)


@contextlib.contextmanager
def serve_gunicorn(
    target: str, *, workers: int = 2, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``gunicorn target`` with uvicorn's worker class as a subprocess, in a process group
    of its own (its workers too, killed whatever happens); yields (base URL, master)."""
    port = free_port()
    with tempfile.NamedTemporaryFile(prefix="gunicorn-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", target, "--bind", f"127.0.0.1:{port}",
             "--workers", str(workers), "--worker-class", "uvicorn_worker.UvicornWorker",
             "--no-control-socket", "--graceful-timeout", "5"],
            env={**os.environ, **(env or {})},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    proc.output_path = log.name  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        yield url, proc
    finally:
        stop_process(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker the master left behind
        os.unlink(log.name)


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
