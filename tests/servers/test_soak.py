"""Soak and hostile input against a real uvicorn subprocess (so RSS is the server's own).

The server (``soak_app`` below, run as ``uvicorn tests.servers.test_soak:soak_app --factory``) counts
every request it handles, independently of loopwatch, just inside the middleware; the tests
compare that count with ``loopwatch_requests_total`` from ``/metrics/``. The client is a small
raw HTTP/1.1 client on asyncio streams: it is several times faster than an HTTP library, so
20,000 requests stay well inside a minute on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.serving import serve_process

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]
TEMPLATES = {"/plain", "/items/{item_id}", "/stream/{n}", "<unmatched>"}


# -- the server -----------------------------------------------------------------------------


class HandledCounter:
    """Counts every request that reaches the app (the middleware's figures are checked
    against it), except its own ``/count`` and the metrics."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.handled = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/count":
                body = str(self.handled).encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
            if not path.startswith("/metrics"):
                self.handled += 1
        await self.app(scope, receive, send)


def soak_app() -> ASGIApp:
    """``uvicorn tests.servers.test_soak:soak_app --factory``: Starlette behind loopwatch."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route

    from loopwatch import LoopWatchMiddleware, metrics_app

    async def plain(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def item(request: Request) -> Response:
        return JSONResponse({"item_id": request.path_params["item_id"]})

    async def stream(request: Request) -> Response:
        async def chunks() -> Any:
            for i in range(int(request.path_params["n"])):
                yield b"%d\n" % i
                await asyncio.sleep(0.002)

        return StreamingResponse(chunks(), media_type="text/plain")

    app = Starlette(
        routes=[
            Route("/plain", plain),
            Route("/items/{item_id:int}", item),
            Route("/stream/{n:int}", stream),
            Mount("/metrics", metrics_app()),
        ]
    )
    return LoopWatchMiddleware(HandledCounter(app), exclude=["/metrics", "/count"])


# -- a raw HTTP/1.1 client ------------------------------------------------------------------


class Connection:
    """One keep-alive connection; reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", self.port, limit=1 << 20
            )
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, target: str) -> tuple[int, bytes]:
        """Status and body; the whole response is read."""
        reader, writer = await self._open()
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: soak\r\n\r\n".encode("latin-1"))
        await writer.drain()
        status, headers = await _read_head(reader)
        if headers.get("transfer-encoding") == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection") == "close":
            self.close()
        return status, body

    async def hang_up_mid_response(self, target: str) -> int:
        """A fresh connection that leaves as soon as the body has started."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
            await writer.drain()
            status, _ = await _read_head(reader)
            await reader.readuntil(b"\r\n")  # the first chunk's size line: the body started
            return status
        finally:
            writer.transport.abort()  # a reset, as a client that crashed or timed out


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += chunk[:-2]


# -- reading the server ---------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    conn = Connection(port)
    try:
        status, body = await conn.request("GET", "/metrics/")
    finally:
        conn.close()
    assert status == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


async def handled(port: int) -> int:
    conn = Connection(port)
    try:
        status, body = await conn.request("GET", "/count")
    finally:
        conn.close()
    assert status == 200
    return int(body)


async def settle(port: int, timeout: float = 15.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Scrape until nothing is in flight (aborted streams finish a moment after the client)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = await scrape(port)
        in_flight = sum(v for _, v in metrics["loopwatch_requests_in_flight"])
        if in_flight == 0 or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.1)


def counted(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> float:
    return sum(v for _, v in metrics.get("loopwatch_requests_total", []))


# -- the soak -------------------------------------------------------------------------------

TOTAL = 20_000
CLIENTS = 40  # concurrent keep-alive connections
WARM_UP = 2_000


def test_soak_counts_every_request_and_memory_stays_flat() -> None:
    with serve_process("tests.servers.test_soak:soak_app", args=("--factory",)) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        rss: dict[str, int] = {"start": rss_kib(proc.pid)}

        async def client(worker: int, jobs: list[int], statuses: list[int]) -> None:
            conn = Connection(port)
            rng = random.Random(worker)
            try:
                for n in jobs:
                    if n % 10 == 0:  # 10 % of requests: the client leaves mid-response
                        statuses.append(await conn.hang_up_mid_response("/stream/200"))
                    elif n % 10 == 5:
                        status, body = await conn.request("GET", "/stream/3")
                        assert body == b"0\n1\n2\n"
                        statuses.append(status)
                    elif n % 2:
                        status, _ = await conn.request("GET", f"/items/{rng.randrange(10**6)}")
                        statuses.append(status)
                    else:
                        statuses.append((await conn.request("GET", "/plain"))[0])
            finally:
                conn.close()

        async def phase(numbers: range) -> list[int]:
            statuses: list[int] = []
            jobs = [list(numbers[i::CLIENTS]) for i in range(CLIENTS)]
            await asyncio.gather(*(client(i, job, statuses) for i, job in enumerate(jobs)))
            return statuses

        async def soak() -> tuple[list[int], dict[str, Any], int]:
            rss["before"] = await handled(port)  # the readiness probe's GET /
            statuses = await phase(range(WARM_UP))
            await settle(port)
            rss["warm"] = rss_kib(proc.pid)
            started = time.monotonic()
            statuses += await phase(range(WARM_UP, TOTAL))
            rss["elapsed_s"] = int(time.monotonic() - started)
            metrics = await settle(port)
            rss["end"] = rss_kib(proc.pid)
            return statuses, metrics, await handled(port)

        statuses, metrics, server_handled = asyncio.run(soak())
        assert proc.poll() is None, "the server died"

    assert len(statuses) == TOTAL and set(statuses) == {200}
    assert server_handled - rss.pop("before") == TOTAL  # every request reached the app once
    assert counted(metrics) == server_handled
    latencies = sum(v for _, v in metrics["loopwatch_request_duration_seconds_count"])
    assert latencies == server_handled
    assert [v for _, v in metrics["loopwatch_requests_in_flight"]] == [0.0]
    streams = [
        v for labels, v in metrics["loopwatch_requests_total"] if labels["route"] == "/stream/{n}"
    ]
    assert sum(streams) == TOTAL // 5  # the aborted 10 % and the complete 10 %
    routes = {labels["route"] for labels, _ in metrics["loopwatch_requests_total"]}
    assert routes == {"/plain", "/items/{item_id}", "/stream/{n}", "<unmatched>"}  # and GET /
    # memory: after warm-up, 18,000 more requests may not grow RSS by more than 8 MiB
    # (a leak of half a KiB per request would); the start figure is before any request
    growth = rss["end"] - rss["warm"]
    print(f"soak: RSS {rss} KiB, growth after warm-up {growth} KiB")
    assert growth < 8 * 1024, rss


# -- hostile input ----------------------------------------------------------------------------

ODD_METHODS = ["BREW", "PROPFIND", "get", "M-SEARCH", "PURGE", "X" * 200]


def random_path(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + "-._~/%!$&'()*+,;=:@"
    kind = rng.random()
    if kind < 0.2:  # matches a template's prefix, with something that is not an int
        return "/items/" + "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 30)))
    if kind < 0.3:  # the template itself: one series however many ids
        return f"/items/{rng.randrange(10**12)}"
    path = "/" + "".join(rng.choices(alphabet, k=rng.randint(1, 120)))
    return path.replace("%", "%" + rng.choice(["00", "ff", "2F", "zz", "C3%A9"]))


def test_hostile_input_keeps_series_bounded_and_the_server_healthy() -> None:
    rng = random.Random(20_000)
    paths = {random_path(rng) for _ in range(12_000)}
    paths = set(sorted(paths)[:10_000])
    assert len(paths) == 10_000
    with serve_process("tests.servers.test_soak:soak_app", args=("--factory",)) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        rss_start = rss_kib(proc.pid)

        async def attack() -> tuple[list[int], dict[str, Any], int]:
            statuses: list[int] = []
            ordered = sorted(paths)
            rng.shuffle(ordered)

            async def worker(chunk: list[str]) -> None:
                conn = Connection(port)
                try:
                    for path in chunk:
                        statuses.append((await conn.request("GET", path))[0])
                finally:
                    conn.close()

            await asyncio.gather(*(worker(ordered[i::CLIENTS]) for i in range(CLIENTS)))
            extremes = [
                ("GET", "/plain?" + "q=" + "x" * 60_000),  # a huge query string
                ("GET", "/plain?" + "&".join(f"k{i}=v{i}" for i in range(5_000))),
                ("GET", "/" + "a" * 65_536),  # a 64 KiB path
                ("GET", "/items/" + "9" * 65_536),  # a 64 KiB int: the template, or unmatched
                *((m, "/plain") for m in ODD_METHODS),
            ]
            for method, target in extremes:
                conn = Connection(port)
                try:
                    statuses.append((await conn.request(method, target))[0])
                except (asyncio.IncompleteReadError, ConnectionError):
                    statuses.append(-1)  # refused by the HTTP parser: fine, if it survives
                finally:
                    conn.close()
            metrics = await settle(port)
            return statuses, metrics, await handled(port)

        statuses, metrics, server_handled = asyncio.run(attack())
        assert proc.poll() is None, "the server died"

        async def still_healthy() -> int:
            conn = Connection(port)
            try:
                return (await conn.request("GET", "/plain"))[0]
            finally:
                conn.close()

        assert asyncio.run(still_healthy()) == 200
        rss_end = rss_kib(proc.pid)

    assert len(statuses) == 10_000 + 4 + len(ODD_METHODS)
    assert statuses.count(404) >= 8_000
    assert counted(metrics) == server_handled >= 10_000
    series = metrics["loopwatch_requests_total"]
    assert {labels["route"] for labels, _ in series} <= TEMPLATES
    assert {labels["method"] for labels, _ in series} <= {"GET", "OTHER"}
    assert len(series) <= 12  # bounded: templates x methods x statuses, not paths
    latency_series = {
        (labels["method"], labels["route"])
        for labels, _ in metrics["loopwatch_request_duration_seconds_count"]
    }
    assert len(latency_series) <= 6
    print(f"hostile: {len(series)} series, server RSS {rss_start} -> {rss_end} KiB")
