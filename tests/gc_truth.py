"""The collector's own account of its pauses, as ground truth for what loopwatch calls ``gc``:
``GcTruth(least).start()`` records every collection of ``least`` seconds or more through
``gc.callbacks``. Standard library only: it runs inside apps that load an older loopwatch
(``benchmarks.demo_gc --ref``)."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any, NamedTuple


class Collection(NamedTuple):
    wall_start: float  # time.time() when it began
    seconds: float
    generation: int
    thread: str  # the thread it ran on (whichever allocated then)


class GcTruth:
    def __init__(self, least: float) -> None:
        self.least = least
        self.collections: list[Collection] = []
        self._began: dict[int, float] = {}

    def start(self) -> GcTruth:
        gc.callbacks.append(self._on_gc)
        return self

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        ident = threading.get_ident()
        if phase == "start":
            self._began[ident] = time.perf_counter()
            return
        began = self._began.pop(ident, None)
        if began is None:
            return
        now = time.perf_counter()
        if now - began >= self.least:
            wall = time.time() - (now - began)
            thread = threading.current_thread().name
            self.collections.append(Collection(wall, now - began, info["generation"], thread))
