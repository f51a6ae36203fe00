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


async def llm_call() -> dict[str, str]:
    """Truly asynchronous I/O, such as a call to a model server."""
    await asyncio.sleep(0.05)
    return {"answer": "42"}
