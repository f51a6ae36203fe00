"""``loopwatch.watch()``: the running loop of a program with no web framework."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import ConfigError
from tests.helpers import StallLog


def _watchdogs() -> int:
    return sum(t.name == "loopwatch-watchdog" for t in threading.enumerate())


def test_watch_finds_a_stall_and_stopping_leaves_no_thread() -> None:
    log = StallLog()
    before = _watchdogs()

    async def main() -> None:
        with loopwatch.watch(registry=CollectorRegistry(), on_stall=log):
            assert _watchdogs() == before + 1
            await asyncio.sleep(0.05)
            time.sleep(0.3)  # the blocking line
            await asyncio.sleep(0.2)
            log.wait_for(1)

    asyncio.run(main())
    (stall,) = log.stalls
    # outside any request: the task's, named by its coroutine (nested: ``outer.inner``)
    assert stall.route == "<task test_watch_finds_a_stall_and_stopping_leaves_no_thread.main>"
    assert stall.duration == pytest.approx(0.3, abs=0.1)
    assert "test_watching.py" in (stall.culprit or "")
    deadline = time.monotonic() + 5
    while _watchdogs() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _watchdogs() == before


def test_watch_outside_a_running_loop_says_so() -> None:
    with pytest.raises(RuntimeError, match="no running event loop"):
        loopwatch.watch()


def test_a_bad_option_raises_at_once() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="threshold"):
            loopwatch.watch(threshold=-1)

    asyncio.run(main())
