"""The README demo's `def` route with a heap whose next full collection is long:
``uvicorn tests.gc_heap_app:app``.

The heap is built at import and frozen (``gc.freeze``), so the server starts without
collecting it. The tenth ``POST /churn`` request collects the rest (quick: the heap is
frozen) and unfreezes the heap, so the collector's long-lived count leaves it out and its next
full collection is due at once, and lowers the thresholds: the next automatic
full collection comes within a few thousand allocations, while the other requests sleep in
the threadpool. It runs on the thread that allocates then: mostly the loop's (the threadpool
only sleeps), as the demo's 0.11 s stall at ``starlette/requests.py:87`` did, sometimes
another (a threadpool or the watchdog thread), holding the loop just as long.

``GET /truth`` is the ground truth: every collection of 50 ms or more, with its thread,
generation and wall-clock start, from the app's own ``gc.callbacks``.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

from fastapi import FastAPI

from loopwatch import LoopWatchMiddleware, metrics_app
from tests.gc_truth import GcTruth

NODES = int(os.environ.get("GC_HEAP_NODES", "700000"))
ARM_AFTER = 10


class _Node:
    def __init__(self, i: int, prev: _Node | None) -> None:
        self.i = i
        self.prev = prev
        self.tags = [i]
        self.meta = {"prev": prev}


def _build(n: int) -> list[_Node]:
    heap: list[_Node] = []
    prev = None
    for i in range(n):
        prev = _Node(i, prev)
        heap.append(prev)
    return heap


HEAP = _build(NODES)
gc.freeze()

TRUTH = GcTruth(0.05).start()

app = FastAPI()
app.add_middleware(LoopWatchMiddleware)
app.mount("/metrics", metrics_app())

_served = 0
_lock = threading.Lock()


@app.post("/churn")
def churn() -> dict[str, int]:
    global _served
    time.sleep(0.3)  # in the threadpool, as the demo's parse_file(): no stall of its own
    with _lock:
        _served += 1
        arm = _served == ARM_AFTER
    if arm:
        gc.collect()  # quick, the heap frozen: what it leaves is the long-lived count
        gc.unfreeze()
        gc.set_threshold(100, 1, 1)
    return {"served": _served}


@app.get("/truth")
def truth() -> dict[str, Any]:
    return {"collections": [c._asdict() for c in TRUTH.collections]}
