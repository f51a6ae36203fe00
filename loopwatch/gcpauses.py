"""The garbage collector's pauses, timed through ``gc.callbacks`` while any loop is watched.

A collection runs on whichever thread allocated last, holding the GIL: for its whole length
the loop cannot run, and no other thread (the watchdog included) can look. The detector asks
afterwards how much of a hold the collector took (``within``), and of which generation, so a
hold the collector made is called ``gc`` instead of being blamed on the line that allocated.

One callback for the process, added when the first monitor starts and removed when the last
stops (stopping leaves no hook behind). It costs two clock reads per collection; only
collections of 1 ms and more are kept, in a short ring.
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from typing import Any

__all__ = ["GcPauses", "gc_pauses"]

_KEPT = 0.001  # shorter collections cannot make a hold of the threshold's size: not kept


class GcPauses:
    """The recent collections of 1 ms or more: ``(start, end, generation, cpu)`` on the
    monitors' clock (``time.monotonic``); ``cpu``, the CPU seconds the collecting thread used
    meanwhile (on a busy machine a collection also waits for a core)."""

    def __init__(self) -> None:
        self.recent: collections.deque[tuple[float, float, int, float]] = collections.deque(
            maxlen=512
        )
        self._users = 0
        self._lock = threading.Lock()
        self._began = 0.0
        self._cpu = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # runs inside the collector, on any thread: nothing may escape, nothing slow
        try:
            if phase == "start":
                self._began = time.monotonic()
                self._cpu = time.thread_time()
            elif self._began:
                end = time.monotonic()
                if end - self._began >= _KEPT:
                    cpu = time.thread_time() - self._cpu
                    generation = int(info.get("generation", -1))
                    self.recent.append((self._began, end, generation, cpu))
                self._began = 0.0
        except Exception:  # pragma: no cover - a clock read cannot fail in practice
            pass

    def start(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1 and self._callback not in gc.callbacks:
                gc.callbacks.append(self._callback)

    def stop(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                while self._callback in gc.callbacks:
                    gc.callbacks.remove(self._callback)
                self._began = 0.0

    @property
    def running(self) -> bool:
        return self._callback in gc.callbacks

    def within(self, start: float, end: float) -> tuple[float, int, float]:
        """Seconds the collector ran between ``start`` and ``end``, the oldest generation it
        collected then (-1 if none), and its CPU seconds in that time (each collection's in
        proportion to its overlap). Safe from any thread."""
        seconds = cpu = 0.0
        generation = -1
        for began, ended, gen, used in tuple(self.recent):  # one C-level copy
            overlap = min(ended, end) - max(began, start)
            if overlap > 0:
                seconds += overlap
                cpu += used * overlap / (ended - began)
                generation = max(generation, gen)
        return seconds, generation, cpu


gc_pauses = GcPauses()
