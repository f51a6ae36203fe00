"""Serving the metrics: ``metrics_app()`` for the app itself, and a side-port server that
answers from its own thread while the event loop is frozen.

The side port serves everything: the exposition, ``/stalls``, ``/profile`` and the live page.
``metrics_app(app_endpoints=...)`` chooses what the app's own mount serves, which may be
public: ``all``, ``metrics`` (the exposition only; the rest is 404) or ``summary`` (no code
location anywhere: stalls and the page without culprits or stacks, no ``/profile``)."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import logging
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder

from loopwatch import fleet, live
from loopwatch.config import ConfigError, Settings, multiprocess_dir, resolve_app_endpoints
from loopwatch.metrics import book_for, scrape_registry
from loopwatch.profile import format_collapsed, parse_seconds
from loopwatch.profile import render as render_profile
from loopwatch.stall import recent_stalls, without_code

__all__ = ["MetricsServer", "metrics_app"]

logger = logging.getLogger("loopwatch")

_render_pool: ThreadPoolExecutor | None = None
_render_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _render_pool
    with _render_pool_lock:
        if _render_pool is None:
            _render_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loopwatch-render")
        return _render_pool


def _header(scope: MutableMapping[str, Any], name: bytes) -> str:
    return ",".join(v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name)


def _pid(query: bytes) -> int | None:
    """``?pid=N``: one worker's figures; ValueError names the value."""
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("pid")
    if not values:
        return None
    text = values[-1]
    if not (text.isdigit() and 0 < int(text) < 1 << 31):
        raise ValueError(f"invalid pid={text!r}: expected a worker's process id")
    return int(text)


def stalls_response(query: bytes, code: bool = True) -> tuple[int, bytes]:
    """Status and body of ``/stalls``: the ring of recent stalls, oldest first, as JSON
    (culprits and stacks included unless ``code`` is False); in multiprocess mode every
    worker's, each with its ``pid`` (``?pid=N``: that worker's only)."""
    try:
        pid = _pid(query)
    except ValueError as exc:
        return 400, f"{exc}\n".encode()
    directory = multiprocess_dir()
    if directory:
        ring = fleet.stalls(directory, pid)
    else:
        ring = [s.as_dict() for s in recent_stalls() if pid is None or pid == os.getpid()]
    if not code:
        ring = [without_code(doc) for doc in ring]
    return 200, json.dumps(ring, indent=1).encode()


def _wants_stalls(path: str) -> bool:
    return path.rstrip("/").endswith("/stalls")


def _wants_profile(path: str) -> bool:
    return path.rstrip("/").endswith("/profile")


def profile_response(query: bytes) -> tuple[int, bytes]:
    """Status and body of ``/profile?seconds=N``: collapsed stacks, or a one-line error; in
    multiprocess mode every worker's (``&pid=N``: that worker's only)."""
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("seconds")
    try:
        seconds = parse_seconds(values[-1] if values else None)
        pid = _pid(query)
    except ValueError as exc:
        return 400, f"{exc}\n".encode()
    directory = multiprocess_dir()
    if directory:
        return 200, format_collapsed(fleet.profile(directory, seconds, pid)).encode("utf-8")
    if pid is not None and pid != os.getpid():
        return 200, b""
    return 200, render_profile(seconds)


_TEXT = b"text/plain; charset=utf-8"


async def _answer(
    send: Any, scope: MutableMapping[str, Any], status: int, content_type: bytes, body: bytes
) -> None:
    """One whole response (no body to a HEAD, its length all the same)."""
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
    ]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})


_NOT_FOUND = b"not found\n"


def render(
    registry: CollectorRegistry, accept: str, accept_encoding: str, query: bytes
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of one scrape, negotiated like prometheus_client's servers."""
    encoder, content_type = choose_encoder(accept)
    names = parse_qs(query.decode("latin-1")).get("name[]")
    source = scrape_registry(registry)
    target: Any = source.restricted_registry(names) if names else source
    body = encoder(target)
    headers = [(b"content-type", content_type.encode())]
    if "gzip" in accept_encoding:
        body = gzip.compress(body, compresslevel=6)
        headers.append((b"content-encoding", b"gzip"))
    headers.append((b"content-length", str(len(body)).encode()))
    return 200, headers, body


class MetricsApp:
    """ASGI app serving the registry; rendering runs off the event loop it watches."""

    loopwatch_metrics_app = True  # the middleware looks for this to skip and fix the mount

    def __init__(
        self, registry: CollectorRegistry | None = None, app_endpoints: str | None = None
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        # checked here: the mount is built with the app, so a bad value stops it loading
        self.app_endpoints = resolve_app_endpoints(app_endpoints)
        book_for(self.registry)  # loopwatch's metrics exist even before the first request

    def _refuses(self, path: str) -> bool:
        """A 404 for what ``app_endpoints`` keeps off this mount (the side port serves it)."""
        if self.app_endpoints == "all":
            return False
        if _wants_profile(path):  # stacks: code locations through and through
            return True
        return self.app_endpoints == "metrics" and (
            live.serves(path, side_port=False) or _wants_stalls(path)
        )

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # a mounted app gets none, but a bare one might
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await send({"type": "http.response.start", "status": 405,
                        "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b""})
            return
        path = scope.get("path", "")
        if self._refuses(path):
            await _answer(send, scope, 404, _TEXT, _NOT_FOUND)
            return
        code = self.app_endpoints == "all"  # "summary": no culprit, stack, path or line
        if live.serves(path, side_port=False):  # the live page and its data
            status, headers, body = await _in_thread(
                live.respond, self.registry, path, scope.get("query_string", b""), None, code
            )
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode(), v.encode()) for k, v in headers]})  # fmt: skip
            await send({"type": "http.response.body",
                        "body": b"" if scope["method"] == "HEAD" else body})  # fmt: skip
            return
        if _wants_stalls(path):
            status, body = await _in_thread(stalls_response, scope.get("query_string", b""), code)
            kind = b"application/json" if status == 200 else _TEXT
            await _answer(send, scope, status, kind, body)
            return
        if _wants_profile(path):
            status, body = await _in_thread(profile_response, scope.get("query_string", b""))
            await _answer(send, scope, status, _TEXT, body)
            return
        status, headers, body = await _in_thread(
            render,
            self.registry,
            _header(scope, b"accept"),
            _header(scope, b"accept-encoding"),
            scope.get("query_string", b""),
        )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})  # fmt: skip


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn`` off the event loop: a scrape never blocks the loop it watches."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio: not watched, but its scrapes still answer
        anyio = sys.modules.get("anyio")
        if anyio is None:
            return fn(*args)
        return await anyio.to_thread.run_sync(lambda: fn(*args))
    return await loop.run_in_executor(_executor(), fn, *args)


def metrics_app(
    registry: CollectorRegistry | None = None, *, app_endpoints: str | None = None
) -> MetricsApp:
    """An ASGI app for ``app.mount("/metrics", metrics_app())``: Prometheus text or
    OpenMetrics, gzip when asked, rendered off the event loop. With ``LoopWatchMiddleware``
    installed, ``GET /metrics`` answers 200 directly (no redirect to ``/metrics/``) and scrapes
    are never counted as requests.

    ``app_endpoints`` (or ``LOOPWATCH_APP_ENDPOINTS``): ``all`` (default), ``metrics`` or
    ``summary``, see the module's docstring; a bad value raises ``ConfigError`` here."""
    return MetricsApp(registry, app_endpoints)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not worth a log line


# In multiprocess mode the worker that binds the side port writes its pid here; another worker
# that finds the port taken checks it: a port some other program holds is an error, not a
# sibling serving it.
_CLAIM_WAIT = 2.0  # seconds a worker waits for the claim of one that bound the port just now


def _claim(host: str, port: int) -> str | None:
    directory = multiprocess_dir()
    if not directory or not port:
        return None
    return os.path.join(directory, fleet.SUBDIR, f"side-port-{host}-{port}")


def _stake(claim: str) -> None:
    try:
        os.makedirs(os.path.dirname(claim), exist_ok=True)
        with open(claim + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(claim + ".tmp", claim)
    except OSError:
        logger.warning("loopwatch: could not record the side port in %s", claim, exc_info=True)


def _held_by_a_worker(claim: str) -> bool:
    """Is the port's claim a live process's (a worker of the same server)? Waits briefly for
    a claim that is not written yet: the worker that bound the port writes it just after."""
    deadline = time.monotonic() + _CLAIM_WAIT
    while True:
        try:
            with open(claim) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid():
            # a dead worker's claim: someone else holds the port now
            return fleet.alive(pid)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


class MetricsServer:
    """The side-port server, one per (host, port, registry), shared and reference-counted."""

    _servers: ClassVar[dict[tuple[str, int, int], MetricsServer]] = {}
    _lock = threading.Lock()

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.host = host
        self.registry = registry
        self._users = 0

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "")
            if method not in ("GET", "HEAD"):  # nothing here is writable
                start_response("405 Method Not Allowed",
                               [("Allow", "GET, HEAD"), ("Content-Length", "0")])  # fmt: skip
                return [b""]
            if live.serves(path, side_port=True):  # the live page (at /) and its data
                query = environ.get("QUERY_STRING", "").encode("latin-1")
                code, page_headers, page = live.respond(registry, path, query, self.port)
                start_response(live.STATUS_LINES[code], page_headers)
                return [b"" if method == "HEAD" else page]
            if _wants_stalls(environ.get("PATH_INFO", "")):
                code, body = stalls_response(environ.get("QUERY_STRING", "").encode("latin-1"))
                start_response("200 OK" if code == 200 else f"{code} Bad Request",
                               [("Content-Type", "application/json" if code == 200
                                 else _TEXT.decode()),
                                ("Content-Length", str(len(body)))])  # fmt: skip
                return [b"" if method == "HEAD" else body]
            if _wants_profile(environ.get("PATH_INFO", "")):
                code, body = profile_response(environ.get("QUERY_STRING", "").encode("latin-1"))
                start_response("200 OK" if code == 200 else f"{code} Bad Request",
                               [("Content-Type", _TEXT.decode()),
                                ("Content-Length", str(len(body)))])  # fmt: skip
                return [b"" if method == "HEAD" else body]
            status, headers, body = render(
                registry,
                environ.get("HTTP_ACCEPT", ""),
                environ.get("HTTP_ACCEPT_ENCODING", ""),
                environ.get("QUERY_STRING", "").encode("latin-1"),
            )
            start_response(f"{status} OK", [(k.decode(), v.decode()) for k, v in headers])
            return [b"" if method == "HEAD" else body]

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._httpd = make_server(host, port, app, Server, handler_class=_QuietHandler)
        self.port: int = self._httpd.server_address[1]
        # the port it got (metrics_port=0 picks any free one): nobody could find it otherwise
        logger.info("loopwatch: side port serving /metrics and the live page at %s", self.page)
        self._closing = False
        # Its own thread: it answers while the event loop is frozen.
        self._thread = threading.Thread(
            target=self._serve, name="loopwatch-metrics-server", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        """``serve_forever``, on the platform's default selector (epoll, kqueue) rather than
        socketserver's poll(): a poll() in progress holds the listening socket open after
        ``release()`` closed it, keeping the port bound until it returns (up to 0.5 s)."""
        httpd = self._httpd
        httpd.timeout = 0.5  # handle_request()'s own wait, should the client have gone
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(httpd.socket, selectors.EVENT_READ)
                while not self._closing:
                    if selector.select(0.5) and not self._closing:
                        httpd.handle_request()
        except (OSError, ValueError):
            if not self._closing:  # else: its socket was closed under it by release()
                raise

    @classmethod
    def acquire(cls, settings: Settings, registry: CollectorRegistry) -> MetricsServer | None:
        """Start (or share) the server for these settings; bind errors name the option.

        In multiprocess mode every worker asks for the same port: the first one binds it and
        serves all workers' figures, the others get None and carry on."""
        if settings.metrics_port is None:
            raise ConfigError("metrics_port", None, settings.source("metrics_port"), "a port")
        key = (settings.metrics_host, settings.metrics_port, id(registry))
        with cls._lock:
            server = cls._servers.get(key) if settings.metrics_port else None
            if server is None:
                claim = _claim(settings.metrics_host, settings.metrics_port)
                try:
                    server = cls(settings.metrics_host, settings.metrics_port, registry)
                except OSError as exc:
                    held = exc.errno == errno.EADDRINUSE and claim is not None
                    if claim is not None and held and _held_by_a_worker(claim):
                        logger.info(
                            "loopwatch: metrics port %s is served by another worker",
                            settings.metrics_port,
                        )
                        return None
                    why = (
                        "held by a process that is not a worker of this server"
                        if held
                        else exc.strerror or str(exc)
                    )
                    raise ConfigError(
                        "metrics_port",
                        settings.metrics_port,
                        settings.source("metrics_port"),
                        f"a port free to bind on {settings.metrics_host} ({why})",
                    ) from exc
                if claim is not None:
                    _stake(claim)
                if settings.metrics_port:
                    cls._servers[key] = server
            server._users += 1
            return server

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            for key, server in list(self._servers.items()):
                if server is self:
                    del self._servers[key]
        # On the event loop (the app's shutdown): close, never wait for the serving thread.
        # The port is free when this returns; the thread ends within its 0.5 s poll.
        self._closing = True
        self._httpd.server_close()

    @property
    def page(self) -> str:
        """The live page's URL (``/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        return self.page + "metrics"
