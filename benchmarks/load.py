"""A small HTTP/1.1 keep-alive load generator, used when ``wrk`` is not installed.

``python -m benchmarks.load --port P --path /r0/42 --connections 64 --duration 5`` prints one
JSON line: requests completed, seconds, requests per second, non-2xx answers, errors. It is
one Python process, so it saturates its core sooner than wrk does: with it, the server may not
be the bottleneck and the ratios between variants shrink (the harness says so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any


class _Counter:
    def __init__(self, limit: int) -> None:
        self.issued = 0
        self.done = 0
        self.non_2xx = 0
        self.errors = 0
        self.limit = limit

    def take(self) -> int | None:
        """The next request's number, or None when the request budget is spent."""
        if self.limit and self.issued >= self.limit:
            return None
        self.issued += 1
        return self.issued


async def _connection(
    host: str, port: int, path_for: Callable[[int], str], counter: _Counter, deadline: float
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        counter.errors += 1
        return
    head = f"Host: {host}:{port}\r\n\r\n".encode()
    try:
        while time.monotonic() < deadline:
            n = counter.take()
            if n is None:
                break
            writer.write(b"GET " + path_for(n).encode() + b" HTTP/1.1\r\n" + head)
            headers = await reader.readuntil(b"\r\n\r\n")
            status = headers[9:12]
            length = 0
            for line in headers.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            counter.done += 1
            if not status.startswith(b"2"):
                counter.non_2xx += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        counter.errors += 1
    finally:
        writer.close()


async def run(
    host: str, port: int, path: str, rotate: int, connections: int, duration: float, requests: int
) -> dict[str, float]:
    def path_for(n: int) -> str:
        return f"/r{n % rotate}/{n}" if rotate else path

    counter = _Counter(requests)
    started = time.monotonic()
    deadline = started + duration
    await asyncio.gather(
        *(_connection(host, port, path_for, counter, deadline) for _ in range(connections))
    )
    seconds = time.monotonic() - started
    return {
        "requests": counter.done,
        "seconds": seconds,
        "rps": counter.done / seconds if seconds > 0 else 0.0,
        "non_2xx": counter.non_2xx,
        "errors": counter.errors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/r0/42", help="the path every request asks for")
    parser.add_argument("--rotate", type=int, default=0, metavar="N",
                        help="spread requests over /r{k}/{n} for k in 0..N-1 instead")  # fmt: skip
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (an upper bound)")
    parser.add_argument("--requests", type=int, default=0, help="stop after this many (0: no cap)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, dict[str, float]]], dict[str, float]] = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(
        run(args.host, args.port, args.path, args.rotate, args.connections, args.duration,
            args.requests)
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
