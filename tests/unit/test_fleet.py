"""The fleet's files (``loopwatch.fleet``): what one worker publishes for the others, how
often, and what a reader makes of them, garbled or foreign files included. The worker that
"reads another's" here reads this process's files renamed to its parent's pid (alive)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from loopwatch import fleet
from loopwatch.monitor import Monitor
from loopwatch.profile import ProfileStore
from loopwatch.stall import RING_SIZE, Stall, clear_recent_stalls, remember
from loopwatch.stats import StatsBook
from tests.unit.test_monitor import LoopThread, start_monitor

OTHER = os.getppid()  # a live pid that is not this process


def a_stall(n: int, route: str = "/slow") -> Stall:
    return Stall(
        route=route, method="GET", kind="wait", duration=0.5, started_at=1000.0 + n,
        culprit="app.py:1 in slow", stack="  File app.py\n",
    )  # fmt: skip


def as_other(directory: Path, kind: str) -> Path:
    """This process's ``kind`` file, renamed as another live worker's."""
    ext = "json" if kind == "state" else "jsonl"
    mine = directory / fleet.SUBDIR / f"{kind}-{os.getpid()}.{ext}"
    theirs = mine.with_name(f"{kind}-{OTHER}.{ext}")
    mine.rename(theirs)
    return theirs


@pytest.fixture(autouse=True)
def _ring() -> Iterator[None]:
    clear_recent_stalls()
    yield
    clear_recent_stalls()


def test_stalls_are_appended_once_each_cut_back_and_read_newest_last(tmp_path: Path) -> None:
    publisher = fleet.Publisher(str(tmp_path))
    for n in range(3):
        remember(a_stall(n))
    publisher.publish()
    publisher.publish()  # nothing new: nothing written
    path = tmp_path / fleet.SUBDIR / f"stalls-{os.getpid()}.jsonl"
    assert len(path.read_bytes().splitlines()) == 3
    for n in range(3, 400):
        remember(a_stall(n))
        publisher.publish()
    lines = path.read_bytes().splitlines()
    assert len(lines) <= RING_SIZE + RING_SIZE // 2  # cut back to the ring now and then
    as_other(tmp_path, "stalls")
    clear_recent_stalls()
    read = fleet.stalls(str(tmp_path))
    assert len(read) == RING_SIZE and {s["pid"] for s in read} == {OTHER}
    assert [s["started_at"] for s in read] == [1000.0 + n for n in range(400 - RING_SIZE, 400)]
    assert fleet.stalls(str(tmp_path), pid=os.getpid()) == []


def test_a_garbled_or_foreign_file_is_read_checked_and_cut_to_size(tmp_path: Path) -> None:
    base = tmp_path / fleet.SUBDIR
    base.mkdir()
    huge = "/<script>x</script>" + "a" * 10_000
    good = {**a_stall(1, huge).as_dict(), "stack": "s" * 100_000}
    wrong = {**a_stall(2).as_dict(), "duration": "long"}
    (base / f"stalls-{OTHER}.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps(wrong) + "\n[1, 2]\n" + '{"route": "/torn'
    )
    (base / "stalls-0.jsonl").write_text(json.dumps(good) + "\n")  # no such worker: ignored
    (base / "stalls-abc.jsonl").write_text(json.dumps(good) + "\n")
    (base / f"state-{OTHER}.json").write_text(
        json.dumps(
            {
                "time": time.time(),
                "stalls": "many",
                "last_stall": None,
                "loops": [
                    {
                        "threshold": 0.1,
                        "in_flight": -3,
                        "blocked": {"seconds": 2.0, "method": "GET", "route": huge, "culprit": 7},
                    },
                    "not a loop",
                ],
            }
        )
    )
    (read,) = fleet.stalls(str(tmp_path))
    assert len(read["route"]) == fleet.MAX_TEXT and read["route"].startswith("/<script>")
    assert len(read["stack"]) == fleet.MAX_STACK and read["pid"] == OTHER
    (worker,) = fleet.workers(str(tmp_path))
    (row,) = worker.loops
    assert row["in_flight"] == 0 and worker.stalls == 0
    assert len(row["blocked"]["route"]) == fleet.MAX_TEXT and row["blocked"]["culprit"] is None
    assert row["blocked"]["seconds"] >= 2.0  # aged by the file's age
    # a state file not refreshed for STALE seconds: its worker is gone
    (base / f"state-{OTHER}.json").write_text(json.dumps({"time": time.time() - 60, "loops": []}))
    assert fleet.workers(str(tmp_path)) == []


def test_the_profile_publishes_finished_seconds_once_a_second(tmp_path: Path) -> None:
    base = int(time.monotonic()) - 10
    now = [base + 0.5]
    store = ProfileStore(clock=lambda: now[0])
    publisher = fleet.Publisher(str(tmp_path), store=store, clock=lambda: now[0])
    store.add(("GET /a", "f (app.py:1)"), 7)
    publisher.publish()  # second `base` is not over: nothing yet
    path = tmp_path / fleet.SUBDIR / f"profile-{os.getpid()}.jsonl"
    assert not path.exists() or path.read_bytes() == b""
    now[0] = base + 1.2
    store.add(("GET /a", "f (app.py:1)"), 5)
    store.add(("GET /b", "g (app.py:2)"), 3)
    publisher.publish()
    size = path.stat().st_size
    publisher.publish()  # the same second: not looked at again
    assert path.stat().st_size == size
    now[0] = base + 2.1
    publisher.publish()
    as_other(tmp_path, "profile")
    empty = ProfileStore(clock=lambda: now[0])
    counts = fleet.profile(str(tmp_path), 60, store=empty)
    assert counts == {("GET /a", "f (app.py:1)"): 12, ("GET /b", "g (app.py:2)"): 3}
    assert fleet.profile(str(tmp_path), 60, pid=os.getpid(), store=empty) == {}
    assert fleet.profile(str(tmp_path), 5, store=empty) == {}  # older than the window


def test_state_is_written_while_held_at_most_once_a_second_else_and_removed_at_stop(
    tmp_path: Path,
) -> None:
    lt = LoopThread()
    try:
        monitor, _ = start_monitor(lt)
        book = StatsBook()
        publisher = fleet.Publisher(str(tmp_path))
        publisher.add(book)
        book.use_mirror(publisher.publish)  # as metrics does in multiprocess mode
        monitor.attach(book)
        path = tmp_path / fleet.SUBDIR / f"state-{os.getpid()}.json"

        def writes(seconds: float) -> tuple[int, list[dict[str, object]]]:
            seen: dict[float, dict[str, object]] = {}  # each write: its own time
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    doc = json.loads(path.read_bytes())
                    seen.setdefault(doc["time"], doc)
                except (FileNotFoundError, ValueError):
                    pass
                time.sleep(0.005)
            return len(seen), list(seen.values())

        time.sleep(1.2)
        healthy, _ = writes(3.0)
        assert 1 <= healthy <= 5, healthy  # about once a second
        lt.loop.call_soon_threadsafe(time.sleep, 1.5)
        held, docs = writes(1.5)
        assert held >= 6, held  # every 0.1 s while the loop is held
        blocked = [d["loops"][0]["blocked"] for d in docs if d["loops"][0]["blocked"]]  # type: ignore[index]
        assert blocked and blocked[-1]["route"] == "<background>", blocked
        lt.call(monitor.release, lt)
        deadline = time.monotonic() + 5
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not path.exists()  # its last loop stopped: it leaves the view
        assert Monitor.current(lt.loop) is None
    finally:
        lt.close()


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_a_side_port_another_program_holds_is_an_error_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a worker that recorded the port (its pid, alive) serves it for the others; a port
    held by anything else fails start-up as it does with one process."""
    from loopwatch import exposition
    from loopwatch.config import ConfigError, Settings

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(exposition, "_CLAIM_WAIT", 0.2)
    registry = CollectorRegistry()
    sock, port = _busy_port()
    with sock:
        settings = Settings.resolve(env={}, metrics_port=port)
        with pytest.raises(ConfigError, match="not a worker of this server"):
            exposition.MetricsServer.acquire(settings, registry)
        claim = tmp_path / fleet.SUBDIR / f"side-port-127.0.0.1-{port}"
        claim.parent.mkdir(parents=True, exist_ok=True)
        claim.write_text(str(OTHER))  # a live worker bound it
        assert exposition.MetricsServer.acquire(settings, registry) is None
        claim.write_text("999999999")  # a dead one's record: the port is someone else's now
        with pytest.raises(ConfigError, match="not a worker of this server"):
            exposition.MetricsServer.acquire(settings, registry)


def test_the_worker_that_binds_the_side_port_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopwatch import exposition
    from loopwatch.config import Settings

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    sock, port = _busy_port()
    sock.close()  # free again
    server = exposition.MetricsServer.acquire(
        Settings.resolve(env={}, metrics_port=port), CollectorRegistry()
    )
    assert server is not None
    try:
        claim = tmp_path / fleet.SUBDIR / f"side-port-127.0.0.1-{port}"
        assert claim.read_text() == str(os.getpid())
    finally:
        server.release()
