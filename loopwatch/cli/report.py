"""``loopwatch report``: loopwatch's diagnosis for any app's ``/metrics`` (or a saved exposition
file), once or refreshed like top."""

from __future__ import annotations

import argparse
import time

from loopwatch.cli.arguments import positive_int, seconds
from loopwatch.cli.diagnosis import diagnose, loop_time, print_diagnosis
from loopwatch.cli.errors import CliError
from loopwatch.cli.output import Output
from loopwatch.cli.scrape import MAX_BODY, load_snapshot
from loopwatch.frames import CodeFilter

__all__ = ["add_parser", "run_report"]


def run_report(args: argparse.Namespace, out: Output) -> int:
    if not args.watch:
        snapshot = load_snapshot(args.source, args.timeout, timeout_option="--timeout")
        loop = loop_time(snapshot)  # one scrape: shares since the app started
        print_diagnosis(out, snapshot, diagnose(snapshot, loop=loop), loop)
        return 0
    code = CodeFilter()
    refreshes = 0
    previous = None  # the last good scrape: loop % is over the interval since it
    try:
        while True:
            try:
                snapshot = load_snapshot(args.source, args.timeout, timeout_option="--timeout")
            except CliError as exc:
                if refreshes == 0:
                    raise
                out.line(f"{time.strftime('%H:%M:%S')}  {exc}", style="red")
            else:
                out.clear()
                out.line(
                    f"{time.strftime('%H:%M:%S')}  refreshing every {args.interval:g}s "
                    "(Ctrl-C to stop)",
                    style="dim",
                )
                loop = loop_time(snapshot, previous)
                print_diagnosis(out, snapshot, diagnose(snapshot, code, loop), loop)
                previous = snapshot
            refreshes += 1
            if args.count and refreshes >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser(
        "report",
        help="print loopwatch's diagnosis from an app's /metrics or a saved exposition file",
        description="Read a loopwatch /metrics endpoint (and its /stalls ring for culprits) or "
        "a Prometheus text file, and print per route: stalls, seconds blocked, share of the "
        "loop's busy time (since start; with --watch over each refresh interval), culprit, fix.",
    )
    report.add_argument(
        "source", help="http(s) URL of /metrics (a bare host:port means /metrics), or a file"
    )
    report.add_argument("--watch", action="store_true", help="refresh like top until Ctrl-C")
    report.add_argument(
        "--interval",
        type=seconds(0.1, strict=False),
        default=2.0,
        help="seconds between refreshes with --watch (default 2)",
    )
    report.add_argument(
        "--count",
        type=positive_int,
        default=None,
        help="with --watch: stop after this many refreshes",
    )
    report.add_argument(
        "--timeout",
        type=seconds(0, strict=True),
        default=5.0,
        help="seconds for the whole read of the metrics and the stall ring (default 5); "
        f"an answer larger than {MAX_BODY} is refused",
    )
    report.add_argument("--plain", action="store_true", help="no colour or table borders")
    report.set_defaults(run=run_report)
