"""gunicorn with two uvicorn workers sharing ``PROMETHEUS_MULTIPROC_DIR`` and one side port,
for the fleet view's tests (``tests.workers_app``)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.serving import free_port, serve_gunicorn


class Fleet:
    """The app's URL, the side port's, and the multiprocess directory."""

    def __init__(self, url: str, side: str, directory: Path) -> None:
        self.url, self.side, self.directory = url, side, directory

    def state(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.side}/ui/state.json", timeout=10).json())

    def pids(self) -> set[int]:
        return {row["pid"] for row in self.state()["event_loops"]}

    def freeze(self, pid: int, seconds: float) -> threading.Thread:
        """Hold worker ``pid``'s loop for ``seconds``: connections go to whichever worker
        accepts, so keep asking (another worker answers 409, holding its loop 30 ms so that
        the next connection goes elsewhere) until the side port says ``pid`` is blocked.
        Returns a thread that ends once every request was answered."""
        threads = []
        deadline = time.monotonic() + 30
        while not any(r["pid"] == pid and r["blocked"] for r in self.state()["event_loops"]):
            assert time.monotonic() < deadline, f"could not freeze worker {pid}"
            thread = threading.Thread(
                target=httpx.get,
                args=(f"{self.url}/freeze/{pid}?seconds={seconds}",),
                kwargs={"timeout": 30, "headers": {"connection": "close"}},
                daemon=True,
            )
            thread.start()
            threads.append(thread)
            time.sleep(0.02)
        waiter = threading.Thread(target=lambda: [t.join(30) for t in threads], daemon=True)
        waiter.start()
        return waiter


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def gunicorn_fleet(directory: Path) -> Iterator[tuple[Fleet, subprocess.Popen[bytes]]]:
    """Two workers, both loops on the side port's page once this yields."""
    port = free_port()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "LOOPWATCH_METRICS_PORT": str(port)}
    with serve_gunicorn("tests.workers_app:app", workers=2, env=env) as (url, proc):
        fleet = Fleet(url, f"http://127.0.0.1:{port}", directory)
        wait_for(lambda: len(fleet.pids()) == 2, 20, "both workers' loops on the side port")
        yield fleet, proc
