"""``loopwatch profile URL``: where an app's event loop time goes, per route and per line, and a
flame graph of it.

It reads two things beside each other: ``<metrics URL>/profile`` (sampled loop stacks of the
last ``--seconds``) and ``/metrics`` itself (``loopwatch_event_loop_busy_seconds_total``, exact,
but totals since the process started: one scrape has no window). Shares are computed from the
samples in the window; the busy seconds are shown beside them as they are.
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loopwatch.cli.arguments import positive_int, seconds
from loopwatch.cli.errors import CliError
from loopwatch.cli.output import Output
from loopwatch.cli.scrape import Deadline, FetchError, fetch
from loopwatch.flamegraph import flamegraph_svg
from loopwatch.frames import CodeFilter
from loopwatch.profile import DEFAULT_SECONDS, KEEP_SECONDS, Stack, parse_collapsed, route_label

__all__ = ["RouteProfile", "add_parser", "busy_totals", "run_profile", "summarise"]

LINES_PER_ROUTE = 3
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*):(?P<line>\d+)\)$")
_LIBRARY = ("site-packages", "dist-packages")


@dataclass
class RouteProfile:
    label: str  # "METHOD ROUTE"
    ms: int  # sampled milliseconds in the window
    share: float  # of all sampled loop time in the window, 0..1
    busy: float | None = None  # exact busy seconds since start, when /metrics has them
    # (where, ms): the innermost application frame of the samples, most first
    lines: list[tuple[str, int]] = field(default_factory=list)


def _where(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    path = m["path"]
    base = os.path.join(os.getcwd(), "")
    if path.startswith(base):
        path = path[len(base) :]
    return f"{path}:{m['line']} in {m['func']}"


def _line_of(stack: Stack, code: CodeFilter) -> str:
    """The innermost application frame (not stdlib, site-packages or loopwatch); a stack with
    none is its leaf, marked as library code."""
    for frame in reversed(stack[1:]):
        m = _FRAME.match(frame)
        if m is None:
            continue
        path = m["path"]
        if code.is_app(path) and not any(part in path for part in _LIBRARY):
            return _where(frame)
    return f"(library) {_where(stack[-1])}" if len(stack) > 1 else "-"


def summarise(
    pairs: Sequence[tuple[Stack, int]], code: CodeFilter | None = None
) -> list[RouteProfile]:
    """Routes by sampled loop time, most first, each with its top lines."""
    code = CodeFilter() if code is None else code
    total = sum(count for _, count in pairs)
    by_route: dict[str, int] = defaultdict(int)
    lines: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for stack, count in pairs:
        by_route[stack[0]] += count
        lines[stack[0]][_line_of(stack, code)] += count
    routes = [
        RouteProfile(
            label,
            ms,
            ms / total if total else 0.0,
            lines=sorted(lines[label].items(), key=lambda kv: (-kv[1], kv[0]))[:LINES_PER_ROUTE],
        )
        for label, ms in by_route.items()
    ]
    routes.sort(key=lambda r: (-r.ms, r.label))
    return routes


def busy_totals(text: str) -> dict[str, float]:
    """``METHOD ROUTE`` -> loopwatch_event_loop_busy_seconds_total, summed over the other
    labels (workers); empty when the exposition has none or does not parse."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = defaultdict(float)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "loopwatch_event_loop_busy_seconds_total":
                    labels = sample.labels
                    # the profile's own spelling of the route (no spaces or separators)
                    key = route_label(labels.get("method", "-"), labels.get("route", "-"))
                    totals[key] += float(sample.value)
    except Exception:  # another exporter's oddities: the busy column shows "-"
        return {}
    return dict(totals)


def _urls(source: str) -> tuple[str, str]:
    """(metrics URL, profile URL) for a metrics URL, a profile URL or a bare host:port."""
    if not source.startswith(("http://", "https://")):
        if not re.fullmatch(r"[\w.\-]+:\d+(/.*)?|\[[0-9a-fA-F:.]+\]:\d+(/.*)?", source):
            raise CliError(
                f"{source!r} is not an http(s) URL (expected e.g. http://127.0.0.1:8000/metrics)"
            )
        source = "http://" + source
    parts = urllib.parse.urlsplit(source)
    path = parts.path.rstrip("/")
    if path.endswith("/profile"):  # as given; its metrics beside it (the side port: any path)
        metrics, profile = path[: -len("/profile")] or "/metrics", path
    else:
        metrics = path or "/metrics"
        profile = metrics + "/profile"
    metrics_url = urllib.parse.urlunsplit(parts._replace(path=metrics, query=""))
    profile_url = urllib.parse.urlunsplit(parts._replace(path=profile, query=""))
    return metrics_url, profile_url


def run_profile(args: argparse.Namespace, out: Output) -> int:
    metrics_url, profile_url = _urls(args.source)
    deadline = Deadline(args.timeout, f"--timeout {args.timeout:g}s")
    url = f"{profile_url}?seconds={args.seconds}"
    try:
        text, _ = fetch(url, deadline)
    except FetchError as exc:
        if exc.status == 404:
            raise CliError(
                f"{profile_url} answered HTTP 404: no loop profile there (expected a loopwatch "
                "metrics_app() mount or its side port, with loopwatch's profile)"
            ) from None
        raise
    pairs = parse_collapsed(text)
    if text.strip() and not pairs:
        raise CliError(f"{profile_url} answered, but not with collapsed stacks")
    try:
        busy = busy_totals(fetch(metrics_url, deadline)[0])
    except CliError:
        busy = {}  # the profile alone still says where the time goes
    routes = summarise(pairs)
    for route in routes:
        route.busy = busy.get(route.label)
    total_ms = sum(r.ms for r in routes)
    out.line(
        f"Loop time by route in the last {args.seconds} s, sampled, from {profile_url}",
        style="bold",
    )
    if not routes:
        out.line(
            "No loop time sampled in that window: the app was idle, or its profile is off "
            "(profile=False, LOOPWATCH_PROFILE=0)."
        )
    else:
        shown = routes[: args.top]
        out.table(
            f"{total_ms / 1000:.2f} s of loop time sampled; share = of that sampled time. "
            "busy s = loopwatch_event_loop_busy_seconds_total (exact, since the app started)",
            ["route", "share", "sampled s", "busy s"],
            [
                [
                    r.label,
                    f"{100 * r.share:.1f}%",
                    f"{r.ms / 1000:.2f}",
                    f"{r.busy:.2f}" if r.busy is not None else "-",
                ]
                for r in shown
            ],
            right=(1, 2, 3),
        )
        if len(routes) > len(shown):
            out.line(f"(and {len(routes) - len(shown)} more route(s); --top to show more)")
        out.line()
        out.line("Top lines (innermost application frame; share of all sampled time):")
        for r in shown:
            out.line(f"  {r.label}")
            for where, ms in r.lines:
                out.line(f"    {100 * ms / total_ms:5.1f}%  {where}")
    if args.svg is not None:
        svg = flamegraph_svg(
            pairs,
            title="loopwatch: event loop time by route",
            subtitle=f"{profile_url}, last {args.seconds} s, {total_ms} ms sampled",
            unit="ms",
        )
        try:
            Path(args.svg).write_text(svg, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {args.svg}: {exc.strerror or exc}") from None
        out.line()
        out.line(f"Flame graph written to {args.svg} (open it in a browser)")
    return 0


def _window(text: str) -> int:
    value = positive_int(text)
    if value > KEEP_SECONDS:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a whole number of seconds from 1 to "
            f"{KEEP_SECONDS} (what the app's profile keeps)"
        )
    return value


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profile = commands.add_parser(
        "profile",
        help="print where the event loop time goes, per route and line; write a flame graph",
        description="Read an app's loop profile (<metrics URL>/profile: sampled stacks of the "
        "loop per route) and its /metrics, print the routes by share of the loop time with "
        "their top lines, and optionally write a flame graph SVG.",
    )
    profile.add_argument(
        "source",
        help="http(s) URL of /metrics or of its /profile (a bare host:port means /metrics)",
    )
    profile.add_argument(
        "--seconds",
        type=_window,
        default=DEFAULT_SECONDS,
        help=f"the window: the last N seconds of samples (default {DEFAULT_SECONDS}, "
        f"at most {KEEP_SECONDS})",
    )
    profile.add_argument(
        "--svg", metavar="FILE", default=None, help="write a flame graph SVG to FILE"
    )
    profile.add_argument("--top", type=positive_int, default=5, help="routes to show (default 5)")
    profile.add_argument(
        "--timeout",
        type=seconds(0, strict=True),
        default=5.0,
        help="seconds for the whole read of the profile and the metrics (default 5)",
    )
    profile.add_argument("--plain", action="store_true", help="no colour or table borders")
    profile.set_defaults(run=run_profile)
