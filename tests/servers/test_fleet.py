"""The fleet view: gunicorn with two uvicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` and one
side port. Whichever worker binds the side port, its page state, ``/stalls`` and ``/profile``
cover both workers' loops: the one frozen now (pid, route, culprit), both workers' stalls
and samples; a worker killed leaves the view, and one stopped cleanly removes its state."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loopwatch.profile import parse_collapsed
from tests.fleet import Fleet, gunicorn_fleet, wait_for

# the workers run tests/workers_app.py, a FastAPI app (the plain-Starlette matrix cell has none)
pytest.importorskip("fastapi")

ROUTE = "/freeze/{pid}"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with gunicorn_fleet(tmp_path) as (found, _):
        yield found


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


def test_a_killed_worker_leaves_the_view_and_a_stopped_one_its_files(tmp_path: Path) -> None:
    with gunicorn_fleet(tmp_path) as (fleet, proc):
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
