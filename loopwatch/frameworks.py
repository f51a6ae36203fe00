"""Frameworks whose router keeps the matched route to itself (Quart, Django): a hook in each
writes the route's template, in the framework's own syntax, into the ASGI scope
(``routes.ROUTE_KEY``) once it has routed the request and before the view runs, where
``routes.route_template`` reads it. Starlette, FastAPI and Litestar leave the route in the scope
themselves and need nothing here.

- **Quart**: a ``before_request`` function, first of the app's: ``request.url_rule.rule``
  (``/items/<int:item_id>``).
- **Django** (``ASGIHandler``, async views): a view middleware, first of the handler's:
  ``request.resolver_match.route`` (``items/<int:item_id>``).

``adapt`` finds the framework's app inside the ASGI wrappers around it (``.app``), once per app,
and imports no framework: the app has imported its own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

from loopwatch.routes import ROUTE_KEY, has_router

__all__ = ["adapt", "wrapped_apps"]

logger = logging.getLogger("loopwatch")

_MAX_DEPTH = 32


def _is_quart(app: Any) -> bool:
    return any(cls.__module__.startswith("quart.") for cls in type(app).__mro__[:-1]) and (
        isinstance(getattr(app, "before_request_funcs", None), dict)
    )


def _is_django(app: Any) -> bool:
    return type(app).__module__.startswith("django.") and isinstance(
        getattr(app, "_view_middleware", None), list
    )


def wrapped_apps(app: Any) -> Iterator[Any]:
    """``app``, then each app inside it through ``.app`` (ASGI wrappers), outermost first."""
    for _ in range(_MAX_DEPTH):
        yield app
        inner = getattr(app, "app", None)
        if inner is None or inner is app:
            return
        app = inner


def _hook_quart(app: Any) -> None:
    quart = sys.modules["quart"]  # the app's own import

    async def loopwatch_route() -> None:
        request = quart.request
        rule = request.url_rule
        if rule is not None:
            request.scope[ROUTE_KEY] = rule.rule

    # first: another before_request may answer the request itself and skip the rest
    hooks = app.before_request_funcs.setdefault(None, [])
    if not _hooked(hooks):
        hooks.insert(0, loopwatch_route)


def _hook_django(handler: Any) -> None:
    async def loopwatch_route(request: Any, view: Any, args: Any, kwargs: Any) -> None:
        route = getattr(getattr(request, "resolver_match", None), "route", None)
        scope = getattr(request, "scope", None)
        if isinstance(route, str) and isinstance(scope, dict):
            scope[ROUTE_KEY] = route

    # the handler awaits each view middleware in turn (async mode); first, before any that
    # answers the request itself
    if not _hooked(handler._view_middleware):
        handler._view_middleware.insert(0, loopwatch_route)


def _hooked(hooks: list[Any]) -> bool:
    """An app served by two middlewares (or two servers) is hooked once."""
    return any(getattr(hook, "__qualname__", "").endswith("loopwatch_route") for hook in hooks)


def adapt(app: Any) -> bool:
    """Hook the framework inside ``app`` (once: call once per app). True if something in it
    routes requests (a router the scope names, or a hooked framework)."""
    try:
        for inner in wrapped_apps(app):
            if _is_quart(inner):
                _hook_quart(inner)
                return True
            if _is_django(inner):
                _hook_django(inner)
                return True
            if has_router(inner):
                return True
    except Exception:  # a framework's object misbehaving: its routes go unnamed, nothing more
        logger.exception("loopwatch: could not hook the app's router; its routes go unnamed")
    return False
