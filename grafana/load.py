"""Steady traffic for the demo app: the article's blockers beside well-behaved endpoints, so
every panel of ``loopwatch-dashboard.json`` has something to show.

    python grafana/load.py http://127.0.0.1:8000 --seconds 20

Each stream is a few workers that send one request, wait ``pause`` seconds and repeat. With
the demo's ``DEMO_WORK_SECONDS=0.3`` the loop is held about 40% of the time by ``GET /async``,
20% by ``POST /my-route`` and 15% by ``GET /cpu`` (the only CPU-bound one), while
``/async-sleep``, ``/sync`` and ``/mixed-fast`` never hold it and only suffer. ``GET /async``
is therefore the worst route by a wide margin, which the end-to-end test relies on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence

import httpx


@dataclasses.dataclass(frozen=True)
class Stream:
    method: str
    path: str
    workers: int
    pause: float  # seconds each worker waits after a response before its next request


MIX: tuple[Stream, ...] = (
    Stream("GET", "/async", 1, 0.4),
    Stream("POST", "/my-route", 1, 1.0),
    Stream("GET", "/cpu", 1, 1.5),
    Stream("GET", "/async-sleep", 4, 0.0),
    Stream("GET", "/sync", 2, 0.0),
    Stream("GET", "/mixed-fast", 1, 0.2),
)


@dataclasses.dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0  # summed latency of the answered requests


async def _worker(
    client: httpx.AsyncClient, stream: Stream, tally: Tally, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            response = await client.request(stream.method, stream.path)
        except httpx.HTTPError:
            tally.failed += 1
            pause = 1.0  # the app is not up yet (docker compose) or went away
        else:
            if response.is_success:
                tally.ok += 1
                tally.seconds += time.perf_counter() - started
            else:
                tally.failed += 1
            pause = stream.pause
        if pause:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)


async def run(url: str, seconds: float, mix: Sequence[Stream] = MIX) -> dict[Stream, Tally]:
    """Drive ``mix`` against ``url`` for ``seconds`` (0: until cancelled); tallies per stream."""
    stop = asyncio.Event()
    tallies = {stream: Tally() for stream in mix}
    limits = httpx.Limits(max_connections=sum(s.workers for s in mix))
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        workers = [
            asyncio.create_task(_worker(client, stream, tallies[stream], stop))
            for stream in mix
            for _ in range(stream.workers)
        ]
        try:
            if seconds:
                await asyncio.sleep(seconds)
            else:
                await asyncio.Event().wait()
        finally:
            stop.set()  # workers finish the request they have in flight, then return
            await asyncio.gather(*workers)
    return tallies


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(
            f"invalid --seconds {text!r}: expected a number of seconds >= 0 (0: run until Ctrl-C)"
        )
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Steady mixed traffic for the loopwatch demo app.")
    parser.add_argument("url", help="base URL of the demo app, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--seconds", type=_seconds, default=0.0, help="how long to run (default 0: until Ctrl-C)"
    )
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"invalid url {args.url!r}: expected http://host:port")
    try:
        tallies = asyncio.run(run(args.url.rstrip("/"), args.seconds))
    except KeyboardInterrupt:
        return 0
    for stream, tally in tallies.items():
        mean = tally.seconds / tally.ok if tally.ok else float("nan")
        print(
            f"{stream.method:4} {stream.path:12} ok={tally.ok:<5} failed={tally.failed:<3} "
            f"mean_latency={mean:.3f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
