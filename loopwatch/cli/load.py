"""The load generator behind ``loopwatch demo``: ApacheBench's ``-n -c`` with keep-alive, on
plain asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from loopwatch.cli.errors import PROG

__all__ = ["Endpoint", "LoadResult", "drive"]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    role: str  # "fake-async" (blocks the loop), "fix", or "async" (really asynchronous)
    what: str
    twin: str | None = None  # for a fix: the fake-async endpoint it fixes
    work: float | None = None  # seconds of blocking work per request, if not --work-seconds


@dataclass
class LoadResult:
    endpoint: Endpoint
    asked: int  # requests asked for
    sent: int
    ok: int  # 2xx answers
    failed: int  # errors and non-2xx answers
    concurrency: int
    wall: float  # seconds from the first request sent to the last answer
    latencies: list[float]
    capped: bool

    @property
    def rps(self) -> float:
        return self.ok / self.wall if self.wall > 0 else 0.0

    @property
    def time_per_request(self) -> float:
        """ApacheBench's "Time per request (mean)": concurrency x wall time / requests."""
        return self.concurrency * self.wall / self.ok if self.ok else math.inf

    @property
    def mean_latency(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else math.inf


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """Send one HTTP/1.1 request on a kept-alive connection and read the whole answer;
    returns (status, whether the connection can be reused)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()  # the body runs to the end of the connection
        return status, False
    return status, headers.get("connection") != "close"


async def drive(
    host: str, port: int, ep: Endpoint, requests: int, concurrency: int, on_done: Callable[[], None]
) -> tuple[float, int, list[float]]:
    """Send ``requests`` requests from ``concurrency`` workers, like ``ab -n -c`` with
    keep-alive; returns (wall seconds, 2xx answers, latencies). Plain asyncio streams: an HTTP
    client library costs ~100 times the CPU per request, and the client shares the machine with
    the server it measures."""
    request = (
        f"{ep.method} {ep.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"User-Agent: {PROG}-demo\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    ok = 0
    left = requests

    async def worker() -> None:
        nonlocal ok, left
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                status, reuse = await _exchange(*conn, request)
                ok += 200 <= status < 300
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, ValueError, IndexError):  # fmt: skip
                reuse = False
            latencies.append(time.perf_counter() - started)
            on_done()
            if not reuse and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()
            with contextlib.suppress(OSError):
                await conn[1].wait_closed()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, ok, latencies
