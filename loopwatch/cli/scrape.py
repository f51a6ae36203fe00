"""Reading a loopwatch exposition (a ``/metrics`` URL or a saved Prometheus text / OpenMetrics
file) and the stall ring served beside it at ``<metrics URL>/stalls``."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopwatch.cli.errors import PROG, CliError

__all__ = [
    "MAX_BODY",
    "Deadline",
    "Exposition",
    "FetchError",
    "RingStall",
    "Snapshot",
    "fetch",
    "load_snapshot",
    "parse_exposition",
]


@dataclass
class Exposition:
    """What one scrape says, per (method, route)."""

    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    # (method, route) -> kind -> [stalls, seconds]
    stalls: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    # (method, route) -> seconds the loop ran code for it since start (summed over workers);
    # empty when the source has no loop-time metric (an older loopwatch, loop_time off)
    busy: dict[tuple[str, str], float] = field(default_factory=dict)
    # loop_time ("exact", "sampled", "off") -> event loops watched (summed over workers);
    # empty when the source predates loopwatch_event_loops
    loops: dict[str, float] = field(default_factory=dict)
    current_stall: float = 0.0
    lag_count: float = 0.0
    has_loopwatch: bool = False


def parse_exposition(text: str, source: str) -> Exposition:
    """Parse Prometheus text (or OpenMetrics) exposition; errors name the source."""
    from prometheus_client.parser import text_string_to_metric_families

    if re.search(r"^# EOF\s*$", text, re.MULTILINE):
        from prometheus_client.openmetrics.parser import (
            text_string_to_metric_families as openmetrics_families,
        )

        parse: Callable[[str], Any] = openmetrics_families
    else:
        parse = text_string_to_metric_families
    expo = Exposition()
    try:
        for family in parse(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, float(sample.value)
                if not name.startswith("loopwatch_"):
                    continue
                expo.has_loopwatch = True
                key = (labels.get("method", "-"), labels.get("route", "-"))
                if name == "loopwatch_requests_total":
                    expo.requests[key] = expo.requests.get(key, 0.0) + value
                elif name.startswith("loopwatch_stall_duration_seconds_"):
                    suffix = name.rsplit("_", 1)[1]
                    if suffix in ("count", "sum"):
                        kinds = expo.stalls.setdefault(key, {})
                        pair = kinds.setdefault(labels.get("kind", "-"), [0.0, 0.0])
                        pair[0 if suffix == "count" else 1] += value
                elif name == "loopwatch_event_loop_busy_seconds_total":
                    expo.busy[key] = expo.busy.get(key, 0.0) + value
                elif name == "loopwatch_event_loops":
                    mode = labels.get("loop_time", "exact")
                    expo.loops[mode] = expo.loops.get(mode, 0.0) + value
                elif name == "loopwatch_current_stall_seconds":
                    expo.current_stall = value
                elif name == "loopwatch_event_loop_lag_seconds_count":
                    expo.lag_count = value
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on bad input
        raise CliError(f"{source} is not a Prometheus text exposition ({exc})") from None
    return expo


# A loopwatch exposition is tens of KiB per hundred routes and the ring at most 256 records:
# past this the source is not what the report expects, and reading on only costs memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_BODY = "64 MiB"
_CHUNK = 64 * 1024


class FetchError(CliError):
    """A GET that did not give a whole answer: ``reason`` says why without the URL, and
    ``status`` is the HTTP status when the server answered with an error."""

    def __init__(self, message: str, reason: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


def _shutdown(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: a read blocked in another thread
    # returns at once (end of file), and the TLS state is left for its owner to close.
    with contextlib.suppress(OSError):  # closed meanwhile: nothing left to wake
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Deadline:
    """One time limit for a whole scrape: every connection, status line, header and body of
    it. A per-read socket timeout does not bound a server that sends 2 bytes a second, so
    when time is up the connection in use is shut down, which ends any read blocked on it."""

    def __init__(self, seconds: float, label: str) -> None:
        self.label = label  # how errors name the limit, e.g. "--timeout 5s"
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.expired or self.remaining() <= 0

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.expired:
                self._socks.append(sock)
                return
        _shutdown(sock)  # connected just as time ran out

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            socks, self._socks = self._socks, []
        for sock in socks:
            _shutdown(sock)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Shut the tracked connections down if time runs out while the block runs."""
        timer = threading.Timer(max(self.remaining(), 0.0), self.expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            with self._lock:
                self._socks.clear()


class _TrackedConnection(http.client.HTTPConnection):
    """Hands its socket to the deadline as soon as it is connected."""

    deadline: Deadline | None = None  # set right after construction, see _tracked()

    def connect(self) -> None:
        super().connect()
        if self.deadline is not None and self.sock is not None:
            self.deadline.track(self.sock)


class _TrackedHTTPSConnection(http.client.HTTPSConnection, _TrackedConnection):
    def connect(self) -> None:
        # The plain socket tracked by the base is detached when TLS wraps it (the handshake
        # is bounded by the socket timeout only); from here on the TLS socket is tracked.
        super().connect()
        if self.deadline is not None and self.sock is not None:
            self.deadline.track(self.sock)


def _tracked(
    cls: type[_TrackedConnection], deadline: Deadline
) -> Callable[..., http.client.HTTPConnection]:
    # urllib builds the connection itself, with arguments that differ between Pythons
    def connection(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
        conn = cls(*args, **kwargs)
        conn.deadline = deadline
        return conn

    return connection


class _TrackedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        return super().do_open(_tracked(_TrackedConnection, self._deadline), req, **kwargs)


class _TrackedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        return super().do_open(_tracked(_TrackedHTTPSConnection, self._deadline), req, **kwargs)


def _too_large(url: str) -> FetchError:
    limit = f"more than {MAX_BODY}, the most loopwatch reads of one answer"
    return FetchError(f"{url} sent {limit}", f"it sent {limit}")


def _read_body(response: http.client.HTTPResponse, url: str) -> bytearray:
    announced = response.headers.get("Content-Length", "")
    if announced.strip().isdigit() and int(announced) > MAX_BODY_BYTES:
        raise _too_large(url)
    body = bytearray()
    while chunk := response.read(_CHUNK):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large(url)
    if response.length:  # read(n) does not raise on a body cut short: say so here
        raise http.client.IncompleteRead(bytes(body), response.length)
    return body


def fetch(url: str, deadline: Deadline) -> tuple[str, str]:
    """(body, content type) of GET url; a one-line FetchError when it does not answer 200 in
    full, within the deadline and the size cap."""
    timed_out = FetchError(
        f"no complete answer from {url} within {deadline.label}",
        f"no complete answer within {deadline.label}",
    )
    if deadline.passed():
        raise timed_out
    opener = urllib.request.build_opener(
        _TrackedHTTPHandler(deadline), _TrackedHTTPSHandler(deadline)
    )
    try:
        request = urllib.request.Request(
            url, headers={"Accept": "text/plain;version=0.0.4", "User-Agent": PROG}
        )
        # the socket timeout bounds the connect; the armed deadline bounds everything
        timeout = max(deadline.remaining(), 0.001)
        with deadline.armed(), opener.open(request, timeout=timeout) as response:
            body = _read_body(response, url)
            content_type = response.headers.get("Content-Type", "")
        if deadline.expired:  # the shutdown ended a body that runs to the end of the stream
            raise timed_out
        return body.decode("utf-8", errors="replace"), content_type
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        message = f"{url} answered HTTP {exc.code} {exc.reason}"
        raise FetchError(message, f"it answered HTTP {exc.code}", exc.code) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if deadline.passed():
            raise timed_out from None
        if isinstance(exc, urllib.error.URLError):
            raise FetchError(f"cannot reach {url}: {exc.reason}", f"{exc.reason}") from None
        # resets, bodies cut short, malformed URLs
        raise FetchError(f"cannot read {url}: {exc!s}", str(exc) or type(exc).__name__) from None


def _metrics_url(url: str) -> str:
    """A bare ``http://host:port`` means the usual ``/metrics`` path."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # "http://[::1/metrics": Invalid IPv6 URL
        raise CliError(
            f"{url!r} is not a valid URL ({exc}): expected e.g. http://127.0.0.1:8000/metrics"
        ) from None
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/metrics"))
    return url


@dataclass(frozen=True)
class RingStall:
    """One record of the stall ring, as much of it as the report uses."""

    method: str
    route: str
    duration: float  # seconds
    culprit: str  # "path:line in function"
    stack: str  # the loop thread's stack, formatted; "" when the record has none


def _ring_stall(item: object) -> RingStall | None:
    """The record, or None when it lacks a field the report needs or has the wrong type."""
    if not isinstance(item, dict):
        return None
    method, route, culprit = item.get("method"), item.get("route"), item.get("culprit")
    duration, stack = item.get("duration"), item.get("stack", "")
    if not (isinstance(method, str) and isinstance(route, str) and isinstance(culprit, str)):
        return None
    if not isinstance(stack, str):
        return None
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        return None
    if not (math.isfinite(duration) and duration >= 0):
        return None
    return RingStall(method, route, float(duration), culprit, stack)


@dataclass
class Snapshot:
    source: str
    expo: Exposition
    stalls: list[RingStall]  # the stall ring; empty when the source has none
    ring_source: str | None
    notes: list[str] = field(default_factory=list)  # what could not be read, one line each
    # time.monotonic() when /metrics answered (a URL); None for a saved file
    taken: float | None = None


def _read_ring(ring_url: str, deadline: Deadline) -> tuple[list[RingStall], list[str]]:
    """The stall ring's readable records, and a note for what was not read. A source without
    a ring (an older loopwatch or another exporter) is no news: culprits show as "-"."""
    try:
        body, content_type = fetch(ring_url, deadline)
    except FetchError as exc:
        if exc.status is not None:
            return [], []
        return [], [f"(stall ring at {ring_url} not read: {exc.reason}; culprits show as '-')"]
    if "json" not in content_type:
        return [], []
    try:
        data = json.loads(body)
    except ValueError:
        return [], [f"(stall ring at {ring_url} is not valid JSON: ignored)"]
    if not isinstance(data, list):
        return [], [f"(stall ring at {ring_url} is not a JSON list: ignored)"]
    records = [_ring_stall(item) for item in data]
    ring = [r for r in records if r is not None]
    skipped = len(records) - len(ring)
    notes = [f"(skipped {skipped} unreadable stall record(s) from {ring_url})"] if skipped else []
    return ring, notes


def _read_file(source: str, path: Path) -> str:
    too_large = CliError(f"{source} is larger than {MAX_BODY}: not a loopwatch exposition")
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_BODY_BYTES:
                raise too_large
            data = f.read(MAX_BODY_BYTES + 1)  # the size may be unknown (0): /proc, a pipe
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror or exc}") from None
    if len(data) > MAX_BODY_BYTES:
        raise too_large
    return data.decode("utf-8", errors="replace")


def load_snapshot(
    source: str, timeout: float = 5.0, *, timeout_option: str | None = None
) -> Snapshot:
    """Read a ``/metrics`` URL (and its ``/stalls`` ring) or a saved exposition file. For a
    URL, ``timeout`` seconds bound both reads together; errors name the limit as
    ``timeout_option`` when given (the command's option)."""
    if source.startswith(("http://", "https://")):
        label = f"{timeout_option} {timeout:g}s" if timeout_option else f"{timeout:g}s"
        deadline = Deadline(timeout, label)
        url = _metrics_url(source)
        text, _ = fetch(url, deadline)
        taken = time.monotonic()  # the app books its loop time up to the scrape
        expo = parse_exposition(text, url)
        if not expo.has_loopwatch:
            raise CliError(
                f"{url} answered, but without loopwatch metrics (no loopwatch_* samples): "
                "is LoopWatchMiddleware installed and metrics_app() mounted there?"
            )
        ring_url = url.split("?", 1)[0].rstrip("/") + "/stalls"
        ring, notes = _read_ring(ring_url, deadline)
        return Snapshot(url, expo, ring, ring_url if ring else None, notes, taken)
    path = Path(source)
    if not path.exists() and re.fullmatch(
        r"[\w.\-]+:\d+(/.*)?|\[[0-9a-fA-F:.]+\]:\d+(/.*)?", source
    ):
        # host:port, as curl reads it
        return load_snapshot("http://" + source, timeout, timeout_option=timeout_option)
    if not path.is_file():
        raise CliError(
            f"{source!r} is neither an http(s) URL nor a readable file "
            "(expected e.g. http://127.0.0.1:8000/metrics or a saved exposition file)"
        )
    text = _read_file(source, path)
    expo = parse_exposition(text, source)
    if not expo.has_loopwatch:
        raise CliError(f"{source} has no loopwatch metrics (no loopwatch_* samples)")
    return Snapshot(source, expo, [], None)
