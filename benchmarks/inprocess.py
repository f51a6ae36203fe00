"""CPU per request with no server and no network: each variant app driven in-process.

``python -m benchmarks.inprocess [--requests 20000] [--rounds 3] [--routes 1]`` builds each
variant of ``benchmarks.apps`` in its own process (pinned with ``--cpu``), runs its lifespan,
then awaits the app directly, one task per request as uvicorn does, and prints the process
CPU time per request. Without sockets and HTTP parsing the middleware's share is larger than
under uvicorn, and a busy machine barely moves the figures: it is the tool for finding where
the microseconds go (``--ablate`` switches parts of loopwatch off; ``--ladder`` builds loopwatch
up one part at a time and prints what each adds to a request).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from benchmarks.apps import PARTS, VARIANTS, build

ABLATIONS = ("bind", "finish", "task-factory", "callbacks")

# ``--ladder``: loopwatch built up one part at a time; each row's difference to the one above
# is what that part costs a request (the issue-19 ablation table in BENCHMARKS.md)
LADDER = (
    ("bare", "bare FastAPI"),
    ("noop", "+ a no-op ASGI middleware"),
    ("loopwatch-monitor", "+ the monitor (heartbeat, watchdog, gc hook)"),
    ("loopwatch-monitor-profile", "+ the loop profile's CPU-time signal"),
    ("loopwatch-stalls", "+ the request path, stalls only"),
    ("loopwatch-no-loop-time", "+ request metrics"),
    ("loopwatch", "+ loop time (the defaults)"),
)


def _ablate(parts: list[str]) -> None:
    """Replace parts of loopwatch's request path with no-ops, to price each one."""
    import loopwatch.middleware as middleware
    from loopwatch.requests import RequestRecord

    if "task-factory" in parts:  # the middleware puts it back on each request otherwise
        setattr(middleware, "install_task_factory", lambda loop: None)  # noqa: B010
    if "bind" in parts:
        setattr(middleware, "bind_request", lambda record: None)  # noqa: B010 (module-private)
        setattr(middleware, "unbind_request", lambda token: None)  # noqa: B010
    if "finish" in parts:
        RequestRecord.finish = lambda self: "<ablated>"  # type: ignore[method-assign]
    if "callbacks" in parts:  # uvloop 3.12+: task steps timed, plain callbacks not
        from loopwatch.scheduling import SchedulingHook

        SchedulingHook.add = lambda self, loop: False  # type: ignore[method-assign]


async def _drive(variant: str, routes: int, requests: int, ablate: list[str]) -> float:
    app = build(variant, routes)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})

    async def lifespan_send(message: MutableMapping[str, Any]) -> None:
        pass

    scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = loop.create_task(app(scope, inbox.get, lifespan_send))
    await asyncio.sleep(0.05)
    if "task-factory" in ablate:
        loop.set_task_factory(None)
    path = f"/r{routes - 1}/42"

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    async def one() -> None:
        request: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": [(b"host", b"bench")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
        }  # fmt: skip
        await app(request, receive, send)

    used = await time_per_request(one, requests)
    await inbox.put({"type": "lifespan.shutdown"})
    await lifespan
    return used


async def time_per_request(one: Callable[[], Awaitable[None]], requests: int) -> float:
    """CPU µs per request (the process's: every thread): ``one`` awaited in a task of its
    own per request, as uvicorn does, after a warm-up."""
    loop = asyncio.get_running_loop()
    for _ in range(min(2000, requests)):
        await loop.create_task(one())
    started = time.process_time()
    for _ in range(requests):
        await loop.create_task(one())
    return (time.process_time() - started) / requests * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--routes", type=int, default=1)
    parser.add_argument("--variants", default="bare,noop,loopwatch-stalls,loopwatch")
    parser.add_argument("--ablate", default="", help=f"comma-separated: {', '.join(ABLATIONS)}")
    parser.add_argument("--cpu", default="0", help="pin each run to this CPU (taskset)")
    parser.add_argument(
        "--ladder", action="store_true",
        help="loopwatch built up one part at a time (--variants and --ablate are ignored)",
    )  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ablate = [a for a in args.ablate.split(",") if a]
    for name in ablate:
        if name not in ABLATIONS:
            parser.error(f"--ablate={name!r}: expected some of {', '.join(ABLATIONS)}")
    if args.ladder and not args.one:
        _ladder(args.requests, args.rounds, args.routes, args.cpu)
        return
    if args.one:  # one measurement, in this process
        _ablate(ablate)
        try:
            import uvloop

            print(uvloop.run(_drive(args.one, args.routes, args.requests, ablate)))
        except ImportError:
            print(asyncio.run(_drive(args.one, args.routes, args.requests, ablate)))
        return
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS + PARTS:
            parser.error(f"--variants={variant!r}: expected some of {', '.join(VARIANTS + PARTS)}")
    figures: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved: A B C A B C
        for variant in variants:
            figures[variant].append(
                _measure(variant, args.ablate, args.requests, args.routes, args.cpu)
            )
    bare = statistics.median(figures["bare"]) if "bare" in figures else None
    suffix = f" (ablated: {args.ablate})" if ablate else ""
    print(f"| variant{suffix} | CPU µs/request (median) | runs | bare/variant |")
    print("|---|---:|---|---:|")
    for variant, values in figures.items():
        med = statistics.median(values)
        ratio = f"{bare / med:.2f}" if bare else "-"
        print(f"| {variant} | {med:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {ratio} |")


def _measure(variant: str, ablate: str, requests: int, routes: int, cpu: str) -> float:
    pin = ["taskset", "-c", cpu] if cpu else []
    out = subprocess.run(
        [*pin, sys.executable, "-m", "benchmarks.inprocess", "--one", variant,
         "--requests", str(requests), "--routes", str(routes), "--ablate", ablate],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def _ladder(requests: int, rounds: int, routes: int, cpu: str) -> None:
    figures: list[list[float]] = [[] for _ in LADDER]
    for _ in range(rounds):  # interleaved: every row once per round
        for i, (variant, _label) in enumerate(LADDER):
            figures[i].append(_measure(variant, "", requests, routes, cpu))
    medians = [statistics.median(values) for values in figures]
    print(
        f"| step ({sys.version.split()[0]}) | CPU µs/request (median) | runs | added | bare/row |"
    )
    print("|---|---:|---|---:|---:|")
    for i, (_variant, label) in enumerate(LADDER):
        added = f"{medians[i] - medians[i - 1]:+.1f}" if i else "-"
        runs = ", ".join(f"{v:.1f}" for v in figures[i])
        ratio = medians[0] / medians[i]
        print(f"| {label} | {medians[i]:.1f} | {runs} | {added} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
