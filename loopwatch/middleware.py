"""``LoopWatchMiddleware``: a pure ASGI middleware that records each request and runs the
event loop monitor for the loop that serves it.

It imports no web framework: the route template is read from the scope after dispatch
(``routes.route_template``), so it works with FastAPI, Starlette or any ASGI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from types import CodeType
from typing import TYPE_CHECKING, Any

from loopwatch.config import ConfigError, Settings
from loopwatch.exposition import MetricsServer
from loopwatch.frameworks import adapt
from loopwatch.metrics import book_for, resolve_registry
from loopwatch.monitor import Monitor, StallCallback
from loopwatch.requests import (
    LIFESPAN,
    RequestRecord,
    bind_lifespan,
    bind_request,
    bind_to_task,
    binds_in,
    install_task_factory,
    needs_task_factory,
    unbind_from_task,
    unbind_request,
)
from loopwatch.routes import declared_routes
from loopwatch.stall import ROUTING
from loopwatch.stats import Shard

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from loopwatch.otel import OtelBridge

__all__ = ["LoopWatchMiddleware"]

logger = logging.getLogger("loopwatch")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]

# Method labels are a fixed set: anything else a client sends is "OTHER".
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_STATUSES = {code: str(code) for code in range(100, 600)}
_LABELS = _METHODS | {"WS"}


class LoopWatchMiddleware:
    """Finds the request whose code blocks the event loop, and counts every request.

    ``app.add_middleware(LoopWatchMiddleware)``; add it last so it is the outermost user
    middleware and sees blocking in every middleware inside it. All options can also be set
    through ``LOOPWATCH_*`` environment variables; an explicit argument wins.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        threshold: float | None = None,
        interval: float | None = None,
        registry: CollectorRegistry | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        on_stall: StallCallback | None = None,
        request_metrics: bool | None = None,
        exclude: Iterable[str] | None = None,
        long_stall: float | None = None,
        loop_time: bool | None = None,
        otel: bool | None = None,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        profile: bool | None = None,
    ) -> None:
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: Monitor | None = None
        self._shard: Shard | None = None
        self._factory = False  # the loop needs loopwatch's task factory (needs_task_factory)
        # how a request is bound and let go: its context (loop time needs it), else its task
        self._binding: tuple[Callable[[RequestRecord], Any], Callable[[Any], None]] = (
            bind_request, unbind_request,
        )  # fmt: skip
        self.metrics_server: MetricsServer | None = None
        # A bad option found while a server already runs (Starlette builds its middleware
        # stack lazily, inside the lifespan call): raised there, the server would take it for
        # "lifespan unsupported" and serve 500s. Kept instead, to fail the lifespan start-up.
        self.config_error: ConfigError | None = None
        try:
            self.settings = Settings.resolve(
                threshold=threshold,
                interval=interval,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
                request_metrics=request_metrics,
                exclude=tuple(exclude)
                if exclude is not None and not isinstance(exclude, str)
                else exclude,
                long_stall=long_stall,
                loop_time=loop_time,
                otel=otel,
                profile=profile,
            )
            if on_stall is not None and not callable(on_stall):
                raise ConfigError("on_stall", on_stall, "argument", "a callable taking a Stall")
            for name, given, method in (
                ("tracer_provider", tracer_provider, "get_tracer"),
                ("meter_provider", meter_provider, "get_meter"),
            ):
                if given is None:
                    continue
                if not callable(getattr(given, method, None)):
                    raise ConfigError(
                        name, given, "argument", f"an OpenTelemetry provider with {method}()"
                    )
                if otel is False:
                    raise ConfigError(name, given, "argument", "None when otel=False")
        except ConfigError as error:
            if not _in_event_loop():
                raise
            self.config_error = error
            return
        self.on_stall = on_stall
        self._providers = (tracer_provider, meter_provider)
        self._otel_resolved = False
        self.otel: OtelBridge | None = None
        # tracing on: reads the request's OpenTelemetry context (one C call per request)
        self._capture_trace: Callable[[], object] | None = None
        self.registry = resolve_registry(registry)
        self.book = book_for(self.registry)
        self.request_metrics = self.settings.request_metrics
        if self.request_metrics:
            self.book.count_requests()
        self._exact = frozenset(self.settings.exclude)
        self._prefixes = tuple(p.rstrip("/") + "/" for p in self.settings.exclude)
        self._metrics_mounts: dict[int, frozenset[str]] = {}
        # the apps whose route table was read (once per app)
        self._declared: set[int] = set()
        # the app without a router this instance serves, if any (one identity test a request)
        self._plain: object = None
        if self.settings.metrics_port is not None:
            # Bound now, so a busy port fails start-up rather than the first request.
            try:
                self.metrics_server = MetricsServer.acquire(self.settings, self.registry)
            except ConfigError as error:
                if not _in_event_loop():
                    raise
                self.config_error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.config_error is not None:
            await _refuse(scope, receive, send, self.config_error)
            return
        kind = scope["type"]
        if kind == "http":
            method = scope.get("method", "")
            if method not in _METHODS:
                method = "OTHER"
        elif kind == "websocket":
            method = "WS"
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        else:
            await self.app(scope, receive, send)
            return

        path = scope.get("path", "")
        root = scope.get("root_path")
        if root and path.startswith(root):  # servers include root_path in path (ASGI spec)
            path = path[len(root) :]
        if (
            "loopwatch" in scope  # an outer loopwatch (a mounted app's) already counts it
            or self._is_metrics_mount(scope)
            or path in self._exact
            or path.startswith(self._prefixes)
        ):
            await self.app(scope, receive, send)
            return

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio, or another event loop: not watched, passed through
            _note_unmonitored()
            await self.app(scope, receive, send)
            return
        monitor = self._monitor
        if loop is not self._loop or monitor is None or not monitor.running:
            self._bind(loop)
            self._declare(scope.get("app") or self.app)  # lifespan off: at the first request
            self._start_otel()
            monitor = self._monitor
        if self._factory:  # uvloop before 3.12: again if the app replaced it at start-up
            install_task_factory(loop)
        shard = self._shard
        if monitor is None or shard is None:  # pragma: no cover - set by _bind
            raise RuntimeError("loopwatch: monitor not bound")

        capture = self._capture_trace
        record = RequestRecord(
            method, scope, scope.get("root_path", ""),
            routed=(scope.get("app") or self.app) is not self._plain,
            trace=capture() if capture is not None else None,
        )  # fmt: skip
        scope["loopwatch"] = True  # a marker, not the record: no reference cycle per request
        bind, unbind = self._binding
        binding = bind(record)
        in_flight = monitor.requests
        in_flight.add(record)
        accountant = monitor.accountant
        if accountant is not None:  # this callback runs it: from now on, the request's time
            accountant.bind(record)
        if not self.request_metrics:
            # stall attribution only: no status, no clock, no route unless a stall needs it
            try:
                await self.app(scope, receive, send)
            finally:
                try:
                    record.end()
                    in_flight.discard(record)
                    if accountant is not None:
                        accountant.finished_request(record)
                finally:
                    unbind(binding)
            return

        shard.request_started()
        status = "500"  # what the server answers if the app raises before responding
        started = time.perf_counter()
        answered = False

        def count() -> None:
            # Once per request: at the final body (latency as the client saw it; background
            # tasks after it still belong to the request for stalls), else when the app ends.
            nonlocal answered
            answered = True
            elapsed = time.perf_counter() - started
            route = record.finish()
            in_flight.discard(record)
            if accountant is not None:  # its last loop time; later work re-queues it
                accountant.finished_request(record)
            shard.count_request(method, route, status, elapsed)

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            mtype = message["type"]
            if mtype == "http.response.body":
                await send(message)
                if not message.get("more_body", False) and not answered:
                    count()
                return
            if mtype == "http.response.start" or mtype == "websocket.http.response.start":
                status = _STATUSES.get(message.get("status", 0), "other")
            elif mtype == "websocket.accept":
                status = "101"
            elif mtype == "websocket.close" and status == "500":
                status = "403"  # closed before accepting: the server answers 403
            elif mtype == "http.response.pathsend":  # the ASGI pathsend extension: final
                await send(message)
                if not answered:
                    count()
                return
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            try:
                if not answered:
                    count()
            finally:  # whatever count() met: a binding left behind outlives its request
                unbind(binding)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        monitor = Monitor.for_loop(loop, self.settings)
        monitor.acquire(self)
        self._shard = monitor.attach(self.book)
        if self.on_stall is not None:
            monitor.add_callback(self.on_stall)
        self._monitor = monitor
        self._loop = loop
        # a factory to keep in place on each request (its start-up set it up already)
        self._factory = needs_task_factory(loop)
        # as the monitor binds (its _start): loop time off, to the task (requests)
        self._binding = (
            (bind_request, unbind_request)
            if monitor.settings.loop_time
            else (bind_to_task, unbind_from_task)
        )
        self._otel_resolved = False  # a new monitor: hand it to OpenTelemetry too

    def _start_otel(self) -> None:
        """Once: hand stalls to OpenTelemetry if it is in use. ``loopwatch.otel`` (and with
        it opentelemetry) is imported only when something loaded opentelemetry already or a
        provider is passed in: a real provider cannot be configured otherwise."""
        monitor = self._monitor
        if self._otel_resolved or monitor is None:
            return
        self._otel_resolved = True
        tracer_provider, meter_provider = self._providers
        if not self.settings.otel or not (
            tracer_provider is not None
            or meter_provider is not None
            or "opentelemetry.trace" in sys.modules
            or "opentelemetry.metrics" in sys.modules
            or "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
            or "OTEL_PYTHON_METER_PROVIDER" in os.environ
        ):
            return
        try:
            from loopwatch import otel
        except ImportError:  # opentelemetry-api is not installed
            return
        try:
            bridge = otel.start(
                self.book, tracer_provider=tracer_provider, meter_provider=meter_provider
            )
        except Exception:
            logger.exception("loopwatch: OpenTelemetry set-up failed; carrying on without it")
            return
        if bridge is None:
            return
        self.otel = bridge
        monitor.use_otel(bridge)  # the loop's first middleware with OpenTelemetry wins
        self._capture_trace = bridge.capture

    def _declare(self, app: Any) -> None:
        """Zero series for the app's routes, read from its route table once per app."""
        if id(app) in self._declared:
            return
        self._declared.add(id(app))
        if not adapt(app):  # (hooks Quart's and Django's routers, which keep the route)
            self._plain = app
        declared = [(m, route) for m, route in declared_routes(app) if m in _LABELS]
        # a stall before routing is booked live under <routing>: zero from start-up too
        self.book.declare(declared)
        self.book.declare((m, ROUTING) for m in {m for m, _ in declared})

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False
        failed: ConfigError | None = None
        answered_failure = False

        async def receive_and_start() -> Message:
            nonlocal started, failed
            message: Message = await receive()
            if message.get("type") == "lifespan.startup":
                if self.metrics_server is None and self.settings.metrics_port is not None:
                    try:
                        self.metrics_server = MetricsServer.acquire(self.settings, self.registry)
                    except ConfigError as error:  # the port was taken since construction
                        failed = error
                        raise
                started = True
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    _note_unmonitored()
                else:
                    self._bind(loop)
                    self._declare(scope.get("app") or self.app)
            return message

        async def send_and_watch(message: Message) -> None:
            nonlocal answered_failure
            if message.get("type") == "lifespan.startup.failed":
                answered_failure = True
            elif message.get("type") == "lifespan.startup.complete" and started:
                # after the app's own start-up, which may configure OpenTelemetry
                self._start_otel()
            await send(message)

        # The app's start-up and shutdown code runs in a task of the server's: bound to the
        # background's owner, so that a hold in it is the app's, not ``<server>``
        # (``owner``: read from this frame by the watchdog before Python 3.12, ``binds_in``)
        owner = LIFESPAN if _on_asyncio() else None
        binding = bind_lifespan() if owner is not None else None
        try:
            await self.app(scope, receive_and_start, send_and_watch)
        except ConfigError as error:
            if error is not failed or answered_failure:
                raise
            await _refuse(scope, None, send, error)
        finally:
            # An app that ignores lifespan returns at once: keep the side port and let the
            # first request start the monitor. After a real start-up, this is the shutdown.
            if binding is not None:
                unbind_request(binding)
                owner = None  # the stack no longer names it: the shutdown below is ours
            if started:
                self.close()

    def start(self) -> None:
        """Watch the running loop now, where no ASGI lifespan would (aiohttp, ``watch()``)."""
        self._bind(asyncio.get_running_loop())
        self._declare(self.app)
        self._start_otel()

    def time_coroutines(self, *codes: CodeType) -> None:
        """Loop time for tasks a framework makes without the loop's task factory."""
        accountant = self._monitor.accountant if self._monitor is not None else None
        if accountant is not None:
            for code in codes:
                accountant.watch_code(code)

    def close(self) -> None:
        """Stop this instance's share of the monitor and the side-port server."""
        monitor, self._monitor, self._loop = self._monitor, None, None
        if monitor is not None:
            monitor.release(self)
        server, self.metrics_server = self.metrics_server, None
        if server is not None:
            server.release()

    def _is_metrics_mount(self, scope: Scope) -> bool:
        """``/metrics`` itself for a ``metrics_app()`` mounted at ``/metrics``: answer it
        directly instead of Starlette's redirect to ``/metrics/``; never count it."""
        # Starlette puts itself in scope["app"]; an app wrapped directly
        # (LoopWatchMiddleware(app)) is self.app
        app = scope.get("app") or self.app
        mounts = self._metrics_mounts.get(id(app))
        if mounts is None:
            mounts = self._metrics_mounts[id(app)] = _find_metrics_mounts(app)
        if not mounts:
            return False
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        for mount in mounts:
            if path == mount:
                scope["path"] = scope["path"] + "/"
                if isinstance(scope.get("raw_path"), bytes):
                    scope["raw_path"] = scope["raw_path"] + b"/"
                return True
            if path.startswith(mount + "/"):
                return True
        return False


# Python < 3.12: the watchdog finds the request of the running task by these frames
binds_in(LoopWatchMiddleware.__call__, "record")
binds_in(LoopWatchMiddleware._lifespan, "owner")


async def _refuse(scope: Scope, receive: Receive | None, send: Send, error: ConfigError) -> None:
    """A bad option: fail the lifespan start-up with its message (the ASGI way: uvicorn,
    gunicorn, hypercorn and granian then exit); a request, if a server skipped lifespan,
    raises it. Never serve as if loopwatch were there."""
    fresh = ConfigError(error.option, error.value, error.source, error.expected)
    if scope["type"] == "lifespan":
        message = {"type": "lifespan.startup"} if receive is None else await receive()
        if message.get("type") == "lifespan.startup":
            logger.error("%s; failing the application start-up", error)
            await send({"type": "lifespan.startup.failed", "message": str(error)})
            raise fresh from None
        return
    raise fresh from None


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio: loopwatch does not watch it
        return False
    return True


def _in_event_loop() -> bool:
    """Code running inside a server's event loop (asyncio, or trio through sniffio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        sniffio = sys.modules.get("sniffio")
        if sniffio is None:
            return False
        try:
            sniffio.current_async_library()
        except Exception:
            return False
    return True


_unmonitored_noted = False


def _note_unmonitored() -> None:
    """Once per process: an app served by something other than an asyncio loop."""
    global _unmonitored_noted
    if _unmonitored_noted:
        return
    _unmonitored_noted = True
    library = "a loop other than asyncio"
    sniffio = sys.modules.get("sniffio")
    if sniffio is not None:
        with contextlib.suppress(Exception):
            library = sniffio.current_async_library()
    logger.warning(
        "loopwatch: this app runs on %s, which loopwatch does not watch: requests pass "
        "through unmonitored and uncounted",
        library,
    )


def _find_metrics_mounts(app: Any) -> frozenset[str]:
    routes = getattr(app, "routes", None)
    if routes is None:
        return frozenset()
    found = set()
    for route in list(routes):
        mounted = getattr(route, "app", None)
        path = getattr(route, "path", None)
        if getattr(mounted, "loopwatch_metrics_app", False) and isinstance(path, str):
            found.add(path.rstrip("/"))
    return frozenset(found)
