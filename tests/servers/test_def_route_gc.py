"""What the README demo's `def` route stall was: a full garbage collection on the loop thread.

The demo once showed ``POST /my-route-sync`` (a `def` route: its work sleeps in the
threadpool) with one 0.11 s ``cpu`` stall at ``starlette/requests.py:87`` and the advice to
use a process pool. Reproduced under load with the app's own ``gc.callbacks`` as ground
truth, every such stall on a threadpool route covered a full collection (generation 2) on
the loop thread, 0.09-0.13 s of it. Here a heap makes that collection long (tests/gc_heap_app.py)
and every view must call it what it was: kind ``gc``, generation 2, the collector's seconds,
and the garbage collector's advice in ``loopwatch report`` rather than a process pool.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loopwatch.cli import main
from tests.helpers import table_rows, text_samples
from tests.serving import LOOPS, serve_process


async def _churn(url: str, requests: int, concurrency: int) -> list[int]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with gate:
                return (await client.post("/churn")).status_code

        return await asyncio.gather(*(one() for _ in range(requests)))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_full_collection_under_a_def_route_is_a_gc_stall_in_every_view(
    loop: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # threshold 50 ms: the collection takes 0.2-0.7 s here, well above it whatever the load
    env = {"LOOPWATCH_THRESHOLD": "0.05"}
    with serve_process("tests.gc_heap_app:app", args=("--loop", loop), env=env) as (url, _):
        statuses = asyncio.run(_churn(url, 60, 20))
        truth = httpx.get(f"{url}/truth", timeout=30).json()
        ring = httpx.get(f"{url}/metrics/stalls", timeout=30).json()
        text = httpx.get(f"{url}/metrics", timeout=30).text
        capsys.readouterr()
        assert main(["report", f"{url}/metrics", "--plain"]) == 0
        report = capsys.readouterr().out
    assert statuses == [200] * 60
    print(json.dumps(truth), json.dumps(ring)[:3000], report, sep="\n")
    # ground truth: one long full collection, on whichever thread allocated then (mostly the
    # loop's): the collector keeps the GIL, so it holds the loop from any thread
    full = [c for c in truth["collections"] if c["generation"] == 2 and c["seconds"] >= 0.1]
    assert len(full) == 1, truth
    collection = full[0]
    stalls = ring if isinstance(ring, list) else ring["stalls"]
    # one stall, and it is the collection: its kind, generation and seconds
    assert len(stalls) == 1, stalls
    stall = stalls[0]
    assert stall["kind"] == "gc", stall
    assert stall["gc_generation"] == 2
    assert stall["gc_seconds"] == pytest.approx(collection["seconds"], abs=0.03)
    assert collection["seconds"] - 0.03 <= stall["duration"] <= collection["seconds"] + 0.15
    start, end = stall["started_at"], stall["started_at"] + stall["duration"]
    assert start - 0.03 <= collection["wall_start"] <= end, (stall, collection)
    owner = f"{stall['method']} {stall['route']}"
    # whoever the loop served as the collector ran: a request (routed or not yet), the
    # server's own code, or nobody (the loop between callbacks, the collector on a thread)
    assert owner in {"POST /churn", "POST <routing>", "- <server>", "- <background>"}, stall
    # the metrics say the same: one stall, of kind gc, for that owner
    counts = {
        labels: value
        for labels, value in text_samples(text, "loopwatch_stall_duration_seconds_count").items()
        if value
    }
    assert counts == {
        (("kind", "gc"), ("method", stall["method"]), ("route", stall["route"])): 1.0
    }, counts
    # and the report: the kind column says gc, the advice is the collector's, no process pool
    shown = owner if stall["method"] != "-" else stall["route"]  # the report's row label
    row = table_rows(report, "route")[shown]
    assert row[2] == "1" and row[5] == "gc", row
    fixes = report.split("How to fix:")[1]
    hint = next(line for line in fixes.splitlines() if line.strip().startswith(shown))
    assert "garbage collector" in hint and "process pool" not in hint, hint
