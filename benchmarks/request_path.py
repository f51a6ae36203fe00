"""loopwatch's own request path around a trivial ASGI app, with no framework, server or network.

``python -m benchmarks.request_path [--requests 30000] [--rounds 3]`` runs each mode in its own
process pinned to one CPU (uvloop if installed, else asyncio): the app answers from its
first line, so every microsecond above bare is the middleware's (its ASGI layer, the binding,
request metrics, loop time) or the monitor's running beside it. Rounds are interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from collections.abc import MutableMapping
from typing import Any

from benchmarks.inprocess import time_per_request

MODES: dict[str, dict[str, bool] | None] = {
    "bare": None,
    "a no-op ASGI middleware": {},
    "stalls only, profile off": {"request_metrics": False, "loop_time": False, "profile": False},
    "stalls only": {"request_metrics": False, "loop_time": False},
    "+ request metrics": {"request_metrics": True, "loop_time": False},
    "+ loop time (defaults)": {"request_metrics": True, "loop_time": True},
}

Message = MutableMapping[str, Any]


async def _app(scope: Message, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Message) -> None:
    pass


async def _drive(mode: str, requests: int) -> float:
    options = MODES[mode]
    loop = asyncio.get_running_loop()
    target: Any = _app
    lifespan = None
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    if options == {}:
        from benchmarks.apps import NoopMiddleware

        target = NoopMiddleware(_app)
    elif options is not None:
        from loopwatch import LoopWatchMiddleware

        target = LoopWatchMiddleware(_app, **options)  # type: ignore[arg-type]
        await inbox.put({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        lifespan = loop.create_task(target(scope, inbox.get, _send))
        await asyncio.sleep(0.05)

    async def one() -> None:
        scope = {"type": "http", "method": "GET", "path": "/x", "root_path": "",
                 "headers": [], "query_string": b""}  # fmt: skip
        await target(scope, _receive, _send)

    used = await time_per_request(one, requests)
    if lifespan is not None:
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
    return used


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.request_path", description=__doc__)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu", default="0", help="pin each run to this CPU (taskset)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        try:
            import uvloop

            print(uvloop.run(_drive(args.one, args.requests)))
        except ImportError:
            print(asyncio.run(_drive(args.one, args.requests)))
        return
    pin = ["taskset", "-c", args.cpu] if args.cpu else []
    figures: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run(
                [*pin, sys.executable, "-m", "benchmarks.request_path", "--one", mode,
                 "--requests", str(args.requests)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            figures[mode].append(float(out.strip().splitlines()[-1]))
    print(f"| mode ({sys.version.split()[0]}) | CPU µs/request (median) | runs | above bare |")
    print("|---|---:|---|---:|")
    bare = statistics.median(figures["bare"])
    for mode, values in figures.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {mode} | {median:.2f} | {runs} | {median - bare:+.2f} |")


if __name__ == "__main__":
    main()
