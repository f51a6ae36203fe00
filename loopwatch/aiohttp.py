"""aiohttp, which is not ASGI: ``loopwatch.aiohttp.setup(app)`` adds loopwatch's middleware, first
of the app's, and stops it at the app's cleanup; ``metrics_handler()`` serves what
``metrics_app()`` serves (the exposition, ``/stalls``, the page)::

    from aiohttp import web
    import loopwatch.aiohttp

    app = web.Application()
    loopwatch.aiohttp.setup(app)                   # LoopWatchMiddleware's options, if any
    app.router.add_get("/metrics{tail:.*}", loopwatch.aiohttp.metrics_handler())

Each request passes through ``LoopWatchMiddleware`` as an ASGI call of its own, so binding,
counting, exclusion and every view are the same code as for an ASGI app. The route is the
matched resource's template (``/items/{item_id}``, aiohttp's syntax); a request no resource
matched is ``<unmatched>``. The latency is to the handler's return (aiohttp writes the response
after the middlewares), or to its last chunk for a response the handler streamed itself.

``loopwatch run`` calls ``setup`` for every ``web.Application`` a runner serves (``attach``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aiohttp import web, web_protocol

from loopwatch.exposition import metrics_app
from loopwatch.middleware import LoopWatchMiddleware
from loopwatch.routes import ROUTE_KEY

__all__ = ["metrics_handler", "setup"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEY = "loopwatch.aiohttp"  # the request, its handler and the response, in the scope
_MIDDLEWARE = web.AppKey("loopwatch", LoopWatchMiddleware)


class _Dispatch:
    """The ASGI app one aiohttp request passes through: runs its handler and tells the status.
    ``router``: it routes (``routes.has_router``), so a request's route is read, not assumed
    unmatched."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self.router = router

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        request, handler, box = scope[_KEY]
        try:
            response = await handler(request)
        except web.HTTPException as answer:  # raised, aiohttp's way to answer 4xx/5xx
            await send({"type": "http.response.start", "status": answer.status})
            await send({"type": "http.response.body", "body": b""})
            raise
        box.append(response)
        await send({"type": "http.response.start", "status": response.status})
        await send({"type": "http.response.body", "body": b""})


async def _nothing_to_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


async def _sent(message: MutableMapping[str, Any]) -> None:
    pass


def _scope(
    request: web.Request, root_path: str = "", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    """The ASGI scope of an aiohttp request."""
    return {
        "type": "http",
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path.encode("latin-1", "replace"),
        "root_path": root_path,
        "query_string": request.query_string.encode("latin-1", "replace"),
        "headers": headers or [],
    }


def _routed_scope(request: web.Request) -> dict[str, Any]:
    """Its scope, with the matched resource's template where the middleware reads it."""
    scope = _scope(request)
    match = request.match_info
    resource = None if match.http_exception is not None else match.route.resource
    if resource is not None:
        scope[ROUTE_KEY] = resource.canonical
    return scope


def setup(app: web.Application, **options: Any) -> LoopWatchMiddleware:
    """Watch ``app``'s loop and its requests; ``options`` are ``LoopWatchMiddleware``'s. Bad
    options raise here, before the app serves. Once per app: a second call returns the
    first's middleware."""
    known = app.get(_MIDDLEWARE)
    if known is not None:
        return known
    watch = LoopWatchMiddleware(_Dispatch(app.router), **options)

    @web.middleware
    async def loopwatch(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = _routed_scope(request)
        box: list[web.StreamResponse] = []
        scope[_KEY] = (request, handler, box)
        await watch(scope, _nothing_to_receive, _sent)
        return box[0]  # the handler ran (or raised, and this is not reached)

    async def start(app: web.Application) -> None:
        watch.start()  # the loop-time hook in place before the first request
        # aiohttp makes its connection and request tasks with asyncio.Task (eagerly on 3.12+),
        # which the loop's task factory never sees: their steps are timed by their code
        handler = getattr(web_protocol, "RequestHandler", None)
        watch.time_coroutines(*(
            code for code in (
                getattr(getattr(handler, name, None), "__code__", None)
                for name in ("start", "_handle_request")
            ) if code is not None
        ))  # fmt: skip

    async def close(app: web.Application) -> None:
        watch.close()

    app.middlewares.insert(0, loopwatch)
    app.on_startup.insert(0, start)
    app.on_cleanup.append(close)
    app[_MIDDLEWARE] = watch
    return watch


def metrics_handler(registry: Any = None, *, app_endpoints: str | None = None) -> Handler:
    """A handler serving ``metrics_app(registry)``'s answers; add it for ``/metrics`` and what
    is below it (``app.router.add_get("/metrics{tail:.*}", metrics_handler())``)."""
    served = metrics_app(registry, app_endpoints=app_endpoints)

    async def handler(request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        prefix = request.path[: len(request.path) - len(tail)] if tail else request.path
        scope = _scope(
            request, prefix.rstrip("/"),
            [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        )  # fmt: skip
        answer: dict[str, Any] = {"headers": [], "body": b""}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = message.get("headers", [])
            else:
                answer["body"] += message.get("body", b"")

        await served(scope, _nothing_to_receive, send)
        response = web.Response(status=answer["status"], body=answer["body"])
        for name, value in answer["headers"]:
            if name.lower() != b"content-length":
                response.headers[name.decode()] = value.decode()
        return response

    return handler
