"""The blocking work the article's endpoints do. Kept in its own module so the culprit line
that loopwatch reports is easy to find: ``demo_app/work.py``."""

from __future__ import annotations

import asyncio
import os
import time


def work_seconds() -> float:
    """Seconds of blocking work per request (``DEMO_WORK_SECONDS``, default 0.5 as in the article)."""
    return float(os.environ.get("DEMO_WORK_SECONDS", "0.5"))


def parse_file() -> dict[str, float]:
    """Stands in for the article's parse_file(): mostly disk I/O, so it sleeps."""
    seconds = work_seconds()
    time.sleep(seconds)  # blocking I/O: fine in a thread, fatal on the event loop
    return {"parsed_seconds": seconds}


def crunch_numbers() -> dict[str, float]:
    """CPU-bound work: a thread does not help under the GIL; a process pool does."""
    deadline = time.perf_counter() + work_seconds()
    total = 0
    while time.perf_counter() < deadline:
        total += sum(range(1000))  # pure computation on the calling thread
    return {"total": float(total)}


CUT_SECONDS = 0.01  # far below the 100 ms threshold: no stall, ever


def sync_lookup() -> dict[str, float]:
    """A thousand cuts: ~10 ms of synchronous work per request (a sync client call to another
    service or a database, a big payload validated and serialised). Too short to stall the
    loop, yet at a hundred requests a second it is the loop's whole time."""
    time.sleep(CUT_SECONDS)  # a sync call: fine in a thread, a cut on the event loop
    return {"looked_up_seconds": CUT_SECONDS}


async def llm_call() -> dict[str, str]:
    """Truly asynchronous I/O, such as a call to a model server."""
    await asyncio.sleep(0.05)
    return {"answer": "42"}
