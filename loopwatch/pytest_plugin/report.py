"""The run's stalls as one document: what an xdist worker sends the controller, the JSON
report (``--loopwatch-report``), and the terminal summary."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from loopwatch.pytest_plugin.records import Record
from loopwatch.stall import SERVER, outside_requests

__all__ = ["WORKEROUTPUT_KEY", "RemoteStalls", "terminal_summary", "write_report"]

REPORT_VERSION = 1

WORKEROUTPUT_KEY = "loopwatch"


@dataclass
class RemoteStalls:
    """The stalls of one process as plain data (what an xdist worker sends the controller):
    each as its report entry, the printed lines of those that fail the run, the failed tests."""

    stalls: list[dict[str, object]]
    stray: list[list[str]]
    failed_tests: list[str]
    loop_time: dict[str, dict[str, float]] = field(default_factory=dict)
    collected: list[list[str]] = field(default_factory=list)  # made by the GC: reported

    def as_message(self) -> dict[str, object]:
        return {
            "stalls": self.stalls,
            "stray": self.stray,
            "failed_tests": self.failed_tests,
            "loop_time": self.loop_time,
            "collected": self.collected,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> RemoteStalls:
        return cls(
            stalls=list(message.get("stalls", [])),
            stray=[list(lines) for lines in message.get("stray", [])],
            collected=[list(lines) for lines in message.get("collected", [])],
            failed_tests=list(message.get("failed_tests", [])),
            loop_time={
                str(nodeid): {str(k): float(v) for k, v in routes.items()}
                for nodeid, routes in message.get("loop_time", {}).items()
            },
        )


def test_loop_time(routes: dict[str, float]) -> dict[str, object]:
    """One test's entry in the report: its loop busy seconds (every loop it owned, all
    phases) and the route that took most of them. Placeholders (``<background>`` and the
    tasks', ``<task main>``: the test's own code and its client; ``<server>``) are the top
    route only when no request took any."""
    top = max(
        routes,
        key=lambda label: (
            label != SERVER and not outside_requests(label),
            routes[label],
            label,
        ),
        default=None,
    )
    return {
        "loop_busy_seconds": round(float(sum(routes.values())), 6),
        "top_route": top,
        "top_route_seconds": round(routes[top], 6) if top is not None else None,
        "routes": {
            label: round(seconds, 6)
            for label, seconds in sorted(routes.items(), key=lambda kv: (-kv[1], kv[0]))
        },
    }


def from_records(
    records: list[Record], failed_tests: list[str], loop_time: dict[str, dict[str, float]]
) -> RemoteStalls:
    """This process's stalls, in the form a worker sends them."""
    return RemoteStalls(
        stalls=[record.as_dict() for record in records],
        stray=[
            record.lines()
            for record in records
            if record.context is None and record.verdict == "failed"
        ],
        collected=[record.lines() for record in records if record.verdict == "gc"],
        failed_tests=failed_tests,
        loop_time=loop_time,
    )


def combine(mine: RemoteStalls, remote: list[RemoteStalls]) -> RemoteStalls:
    """Every stall of the run: this process's and, on an xdist controller, the workers'."""
    for other in remote:
        mine.stalls.extend(other.stalls)
        mine.stray.extend(other.stray)
        mine.collected.extend(other.collected)
        mine.failed_tests.extend(other.failed_tests)
        mine.loop_time.update(other.loop_time)
    mine.failed_tests.sort()
    return mine


def write_report(path: str, threshold: float, everything: RemoteStalls) -> None:
    counts = {v: 0 for v in ("failed", "allowed", "below-threshold", "gc")}
    for stall in everything.stalls:
        counts[str(stall["verdict"])] += 1
    from loopwatch.version import __version__

    document = {
        "version": REPORT_VERSION,
        "loopwatch": __version__,
        "threshold": threshold,
        "summary": {"stalls": len(everything.stalls), **counts},
        "failed_tests": everything.failed_tests,
        "stalls": everything.stalls,
        "tests": {
            nodeid: test_loop_time(routes)
            for nodeid, routes in sorted(everything.loop_time.items())
        },
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        json.dump(document, out, indent=2)
        out.write("\n")


def terminal_summary(
    terminalreporter: Any, everything: RemoteStalls, threshold: float, report_path: str | None
) -> None:
    stalls = everything.stalls
    failed = sum(s["verdict"] == "failed" for s in stalls)
    allowed = sum(s["verdict"] == "allowed" for s in stalls)
    collected = sum(s["verdict"] == "gc" for s in stalls)
    if not stalls and report_path is None:
        return
    terminalreporter.section("loopwatch", sep="-")
    terminalreporter.line(
        f"{len(stalls)} stall(s) past {threshold:g}s: {failed} failed, {allowed} allowed"
        + (f", {collected} made by the garbage collector (reported)" if collected else "")
    )
    if everything.collected:
        terminalreporter.line(
            "made by the garbage collector (not failed; --loopwatch-gc=fail fails them):",
            yellow=True,
        )
        for lines in everything.collected:
            for line in lines:
                terminalreporter.line(line)
    if everything.stray:
        terminalreporter.line(
            "blocking in loops not owned by the running test (this fails the run):", red=True
        )
        for lines in everything.stray:
            for line in lines:
                terminalreporter.line(line)
    if report_path is not None:
        terminalreporter.line(f"report written to {report_path}")
