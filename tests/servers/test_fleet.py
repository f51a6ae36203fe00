"""The fleet view: gunicorn with two uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` and one
side port. Whichever worker binds the side port, its page state, ``/stalls`` and ``/profile``
cover both workers' loops: the one frozen now (pid, route, culprit), both workers' stalls
and samples; a worker killed leaves the view, and one stopped cleanly removes its state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loopwatch.profile import parse_collapsed
from tests.serving import serve_gunicorn

ROUTE = "/freeze/{pid}"


class Fleet:
    def __init__(self, url: str, side: str, directory: Path) -> None:
        self.url, self.side, self.directory = url, side, directory

    def state(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.side}/ui/state.json", timeout=10).json())

    def pids(self) -> set[int]:
        return {row["pid"] for row in self.state()["event_loops"]}

    def freeze(self, pid: int, seconds: float) -> threading.Thread:
        """Hold worker ``pid``'s loop for ``seconds``: connections go to whichever worker
        accepts, so keep asking (another worker answers 409, holding its loop 30 ms so that
        the next connection goes elsewhere) until the side port says ``pid`` is blocked."""
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


@pytest.fixture
def fleet(tmp_path: Path, free_side_port: int) -> Iterator[Fleet]:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "LOOPWATCH_METRICS_PORT": str(free_side_port)}
    with serve_gunicorn("tests.workers_app:app", workers=2, env=env) as (url, _):
        side = Fleet(url, f"http://127.0.0.1:{free_side_port}", tmp_path)
        wait_for(lambda: len(side.pids()) == 2, 20, "both workers' loops on the side port")
        yield side


@pytest.fixture
def free_side_port() -> int:
    from tests.serving import free_port

    return free_port()


def test_the_side_port_shows_every_workers_loop_stalls_and_profile(fleet: Fleet) -> None:
    state = fleet.state()
    serving = state["pid"]
    assert state["multiprocess"] is True and state["workers"] == 2 and state["loops"] == 2
    (other,) = fleet.pids() - {serving}
    # the worker that does not serve the side port freezes: its row says so, live
    done = fleet.freeze(other, 3.0)
    state = fleet.state()
    rows = {row["pid"]: row for row in state["event_loops"]}
    blocked = rows[other]["blocked"]
    assert blocked["method"] == "GET" and blocked["route"] == ROUTE, blocked
    assert rows[serving]["blocked"] is None, rows
    assert state["blocked"]["pid"] == other and state["blocked"]["route"] == ROUTE
    first = blocked["seconds"]
    time.sleep(1.0)
    later = {row["pid"]: row for row in fleet.state()["event_loops"]}[other]["blocked"]
    assert later is not None and later["seconds"] >= first + 0.7, (first, later)
    assert "hold_the_loop" in (later["culprit"] or ""), later  # sampled past half the threshold
    done.join(30)
    wait_for(lambda: fleet.state()["blocked"] is None, 5, "the freeze to end on the page")
    # and the worker that serves it: its own thread answers while its loop is held
    done = fleet.freeze(serving, 1.0)
    assert fleet.state()["blocked"]["pid"] == serving
    done.join(30)
    time.sleep(2.5)  # each worker publishes its finished seconds of profile about once a second

    ring = httpx.get(f"{fleet.side}/stalls", timeout=10).json()
    frozen = {(s["pid"], s["route"]) for s in ring if s["duration"] > 0.9}
    assert frozen == {(other, ROUTE), (serving, ROUTE)}, ring
    assert all("hold_the_loop" in s["culprit"] for s in ring if s["duration"] > 0.9), ring
    assert [s["started_at"] for s in ring] == sorted(s["started_at"] for s in ring)
    only = httpx.get(f"{fleet.side}/stalls?pid={other}", timeout=10).json()
    assert only and {s["pid"] for s in only} == {other}
    assert httpx.get(f"{fleet.side}/stalls?pid=x", timeout=10).status_code == 400
    # the page's own lists: both workers' stalls
    page = httpx.get(f"{fleet.side}/ui/stalls.json", timeout=10).json()["stalls"]
    assert {(s["pid"], s["route"]) for s in page if s["duration"] > 0.9} == frozen

    def held_ms(query: str) -> int:
        text = httpx.get(f"{fleet.side}/profile?seconds=60{query}", timeout=10).text
        return sum(n for stack, n in parse_collapsed(text) if "hold_the_loop" in stack[-1])

    mine, theirs, both = held_ms(f"&pid={serving}"), held_ms(f"&pid={other}"), held_ms("")
    assert theirs >= 2400 and mine >= 700, (theirs, mine)
    assert both == mine + theirs, (both, mine, theirs)


def test_a_killed_worker_leaves_the_view_and_a_stopped_one_its_files(
    tmp_path: Path, free_side_port: int
) -> None:
    import os
    import signal

    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "LOOPWATCH_METRICS_PORT": str(free_side_port)}
    with serve_gunicorn("tests.workers_app:app", workers=2, env=env) as (url, proc):
        fleet = Fleet(url, f"http://127.0.0.1:{free_side_port}", tmp_path)
        wait_for(lambda: len(fleet.pids()) == 2, 20, "both workers' loops on the side port")
        (other,) = fleet.pids() - {fleet.state()["pid"]}
        os.kill(other, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: other not in fleet.pids(), 5, "the killed worker to leave the view")
        assert time.monotonic() - killed < 5
        assert not (tmp_path / "loopwatch" / f"state-{other}.json").exists()
        # gunicorn starts another worker: it joins the view
        wait_for(lambda: len(fleet.pids()) == 2, 20, "the new worker's loop")
        workers = fleet.pids()
        proc.terminate()  # gunicorn stops its workers gracefully
        proc.wait(20)
    states = sorted(p.name for p in (tmp_path / "loopwatch").glob("state-*"))
    assert states == [], (states, workers)
