"""Small shared helpers for the tests: waiting for stalls, reading samples, reading tables."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from loopwatch import Stall


class StallLog:
    """An ``on_stall`` callback that keeps what it gets and lets a test wait for it."""

    def __init__(self) -> None:
        self.stalls: list[Stall] = []
        self._cond = threading.Condition()

    def __call__(self, stall: Stall) -> None:
        with self._cond:
            self.stalls.append(stall)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Stall]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.stalls) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected {count} stall(s) within {timeout}s, got {self.stalls}"
                    )
                self._cond.wait(left)
            return list(self.stalls)

    def routes(self) -> list[str]:
        return [s.route for s in self.stalls]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def eventually(check: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.02)


def text_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called ``name`` in a scraped exposition, by their sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_route(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    """``text_samples``' values summed per route over the other labels; routes at 0 (every
    route's series is declared up front) left out."""
    total: dict[str, float] = {}
    for labels, value in samples.items():
        if value:
            route = dict(labels)["route"]
            total[route] = total.get(route, 0) + value
    return total


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    """Label sets of every sample called ``name``."""
    return [
        dict(s.labels) for family in registry.collect() for s in family.samples if s.name == name
    ]


def burn_first(seconds: float) -> None:
    """Pure-Python work for ``seconds`` of this thread's CPU time (two such functions, one
    name each, so a profile tells them apart)."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def burn_second(seconds: float) -> None:
    """``burn_first``'s twin under another name."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


def table_rows(output: str, first_header: str) -> dict[str, list[str]]:
    """Rows of the table whose header starts with ``first_header``, keyed by the first cell
    ("GET /sync"), cells split on runs of two or more spaces."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first_header))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not re.match(r"^\s*(GET|POST|PUT|DELETE|PATCH|-|<)", line):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows
