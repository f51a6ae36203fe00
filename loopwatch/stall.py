"""The ``Stall`` record, the ring of recent stalls and the one-line log format."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKGROUND",
    "BACKGROUND_LABEL",
    "OTHER_TASKS",
    "SERVER_LABEL",
    "UNMATCHED",
    "Stall",
    "clear_recent_stalls",
    "outside_requests",
    "recent_stalls",
]

# Fixed label placeholders: label values are route templates or one of these, never raw input.
UNMATCHED = "<unmatched>"
BACKGROUND = "<background>"
SERVER = "<server>"  # the server's own work: protocol callbacks, its main loop
ROUTING = "<routing>"  # a request's code before it was routed (a middleware inside ours)
OWN = "<loopwatch>"  # loopwatch's own work on the loop: never booked to the app
# the app's tasks past the cap on named ones (``<task consume>``, ``tasknames``)
OTHER_TASKS = "<other tasks>"
# (method, route) of code no request owns: every view's label for it
BACKGROUND_LABEL = ("-", BACKGROUND)
SERVER_LABEL = ("-", SERVER)


def outside_requests(route: str) -> bool:
    """A label of the app's code that no request ran: ``<background>``, a task's
    (``<task consume>``) or ``<other tasks>``."""
    return route in (BACKGROUND, OTHER_TASKS) or route.startswith("<task ")


RING_SIZE = 256


@dataclass(frozen=True)
class Stall:
    """One stretch of time during which one owner (a request or background code) held the loop."""

    route: str
    method: str
    # "gc": the garbage collector ran for most of it; "gil": the loop thread computed keeping
    # the GIL (one C call); "cpu": it computed, letting the GIL go; "wait": it slept or blocked
    kind: str
    duration: float  # seconds
    started_at: float  # wall-clock (time.time()) start
    culprit: str  # "path:line in function", innermost application frame
    stack: str = field(repr=False)  # the loop thread's stack, formatted, innermost last
    requests_in_flight: int = 0
    cpu_seconds: float = 0.0
    # the culprit request's active span when loopwatch saw it (OpenTelemetry on, span
    # sampled): hex ids for logs and exemplars, and the span context the stall span's parent
    trace_id: str = ""
    span_id: str = ""
    span_context: Any = field(default=None, repr=False, compare=False)
    gc_seconds: float = 0.0  # the garbage collector's part of it
    gc_generation: int = -1  # the oldest generation it collected then (-1: none)

    def describe(self) -> str:
        """The one-line summary used in the WARNING log line."""
        gc = (
            f"; garbage collection {self.gc_seconds:.3f}s (generation {self.gc_generation})"
            if self.gc_seconds >= 0.001
            else ""
        )
        return (
            f"event loop blocked for {self.duration:.3f}s by {self.method} {self.route} "
            f"({self.kind}) at {self.culprit}; {self.requests_in_flight} request(s) in flight{gc}"
        )

    def as_dict(self, *, code: bool = True) -> dict[str, object]:
        """Every field; ``code=False``: only the route, timing and counts (a list of what
        may go out, so a field added later is not published by default)."""
        if not code:
            return without_code(self.as_dict())
        return {
            "route": self.route,
            "method": self.method,
            "kind": self.kind,
            "duration": self.duration,
            "started_at": self.started_at,
            "culprit": self.culprit,
            "stack": self.stack,
            "requests_in_flight": self.requests_in_flight,
            "cpu_seconds": self.cpu_seconds,
            "gc_seconds": self.gc_seconds,
            "gc_generation": self.gc_generation,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
        }


# what a stall may show where code locations may not go (``app_endpoints="summary"``): a
# list of what may go out, so a field added later is not published by default
_NO_CODE = ("route", "method", "kind", "duration", "started_at", "requests_in_flight",
            "cpu_seconds", "gc_seconds", "gc_generation", "pid")  # fmt: skip


def without_code(doc: dict[str, object]) -> dict[str, object]:
    """A stall's record (``as_dict``, or a worker's in multiprocess mode) with only its
    route, timing and counts: no culprit, stack, path or line."""
    return {key: doc[key] for key in _NO_CODE if key in doc}


_ring: collections.deque[Stall] = collections.deque(maxlen=RING_SIZE)
_ring_lock = threading.Lock()


def remember(stall: Stall) -> None:
    with _ring_lock:
        _ring.append(stall)


def recent_stalls() -> list[Stall]:
    """The most recent stalls in this process (at most 256), oldest first."""
    with _ring_lock:
        return list(_ring)


def clear_recent_stalls() -> None:
    with _ring_lock:
        _ring.clear()
