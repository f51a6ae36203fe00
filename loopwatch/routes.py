"""Route templates read from the ASGI scope after dispatch, without importing a framework.

Starlette's router writes the matched route into the scope (``scope["route"]``, and
``scope["root_path"]`` grows by each ``Mount`` prefix), so the template costs a few dict
lookups per request instead of a walk of the route table. FastAPI 0.137+ dispatches
``include_router`` routes through ``_IncludedRouter`` and leaves the *original* route in the
scope (its path lacks the router prefixes); the full template is then in FastAPI's own
"effective route context". Older Starlette wrote only ``scope["endpoint"]``: that case falls
back to a table built once per router.

Litestar writes the matched route's template into the scope (``scope["path_template"]``)
beside the handler (``scope["route_handler"]``), without its parameters' types: the path as the
app declared it (``/items/{item_id:int}``, Litestar's own syntax) comes from a table of the
app's routes (``scope["app"]``), built once.

Every template leaves here safe to show (``names.clip``: escaped, cut to 200 characters), so
that every view names the same route.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from loopwatch.names import clip

__all__ = ["ROUTE_KEY", "declared_routes", "has_router", "route_template"]

# where a framework hook (``frameworks``) leaves the template of a router that keeps it to
# itself (Quart, Django), in the framework's own syntax
ROUTE_KEY = "loopwatch.route"

_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(:[a-zA-Z_][a-zA-Z0-9_]*)?}")


def route_template(scope: Mapping[str, Any], root_path: str) -> str | None:
    """The full template of the route the scope was dispatched to, or None if it matched none.

    ``root_path`` is the scope's root path as the middleware first saw it: whatever the
    routers added to it since is the mount prefix.
    """
    template = scope.get(ROUTE_KEY)
    if isinstance(template, str):
        return clip(_mount_prefix(scope, root_path) + template)
    template = scope.get("path_template")
    if isinstance(template, str) and "route_handler" in scope:
        # Litestar's router writes the matched route's template, without its parameters'
        # types (``/items/{item_id}``), beside the handler; a 404 or 405 writes neither
        return clip(_mount_prefix(scope, root_path) + _litestar_path(scope.get("app"), template))
    route = scope.get("route")
    if route is None:
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return None
        path = _legacy_template(scope.get("router"), endpoint)
        if path is None:
            return None
    else:
        methods = getattr(route, "methods", None)
        if methods is not None and scope.get("method") not in methods:
            return None  # a partial match: Starlette answers 405 from this route
        if not hasattr(route, "endpoint"):
            # a Mount: the request reached its app but nothing inside matched, unless the
            # mounted app is a plain ASGI app (static files, a metrics app) with no routes
            if _child_routes(route):
                return None
            return clip(_mount_prefix(scope, root_path) + "/{path}")
        path = _effective_path(scope, route)
        if path is None:
            return None
    return clip(_mount_prefix(scope, root_path) + path)


def _effective_path(scope: Mapping[str, Any], route: Any) -> str | None:
    fastapi_scope = scope.get("fastapi")
    if type(fastapi_scope) is dict:
        context = fastapi_scope.get("effective_route_context")
        if context is not None and getattr(context, "original_route", None) is route:
            path = getattr(context, "path_format", None)
            if isinstance(path, str):
                return path
    path = getattr(route, "path_format", None)
    if isinstance(path, str):
        return path
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def _mount_prefix(scope: Mapping[str, Any], root_path: str) -> str:
    current = scope.get("root_path", "")
    if not isinstance(current, str) or current == root_path:
        return ""
    prefix = current[len(root_path) :] if current.startswith(root_path) else current
    templates = _parametric_mounts(scope.get("router"))
    if templates:
        # a Mount with parameters puts their values in root_path: map back to its template
        for pattern, template in templates:
            if pattern.fullmatch(prefix):
                return template
    return prefix


# Per-router tables, built once the first time a router is seen (never per request).
_tables_lock = threading.Lock()
_parametric: weakref.WeakKeyDictionary[Any, list[tuple[re.Pattern[str], str]]] = (
    weakref.WeakKeyDictionary()
)
_legacy: weakref.WeakKeyDictionary[Any, dict[Any, str]] = weakref.WeakKeyDictionary()


# Litestar apps are not weak-referenceable (``__slots__``); they live as long as the process
_litestar: dict[int, tuple[Any, dict[str, str]]] = {}


def _litestar_path(app: Any, template: str) -> str:
    """The route's path as the app declared it (``/items/{item_id:int}``), from a table of its
    routes built once per app (again for a route registered since); else ``template``."""
    known = _litestar.get(id(app))
    if known is None or known[0] is not app or template not in known[1]:
        table: dict[str, str] = {}
        try:
            for route in getattr(app, "routes", ()):
                path, shape = getattr(route, "path", None), getattr(route, "path_format", None)
                if isinstance(path, str) and isinstance(shape, str):
                    table.setdefault(shape, path)
        except TypeError:  # its routes are not iterable: not a Litestar app
            return template
        table.setdefault(template, template)  # not among its routes: never rebuilt for it again
        with _tables_lock:
            _litestar[id(app)] = known = (app, table)
    return known[1].get(template, template)


def _child_routes(route: Any) -> list[Any]:
    routes = getattr(route, "routes", None)
    if routes is None:
        original = getattr(route, "original_router", None)  # FastAPI's _IncludedRouter
        routes = getattr(original, "routes", None)
    try:
        return list(routes or ())
    except TypeError:
        return []


def _walk_mounts(routes: list[Any], prefix: str, out: list[tuple[str, bool]], depth: int) -> None:
    if depth > 16:
        return
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str) or not hasattr(route, "app") or hasattr(route, "endpoint"):
            continue  # not a Mount
        children = _child_routes(route)
        template = prefix + path
        if children or "{" in path:  # a parametric mount of a plain ASGI app counts too
            out.append((template, "{" in path))
        _walk_mounts(children, template, out, depth + 1)


def _template_regex(template: str) -> str:
    """``/t/{tenant}/files/{rest:path}`` -> a regex for concrete prefixes of that template."""
    out, last = [], 0
    for match in _PARAM.finditer(template):
        out.append(re.escape(template[last : match.start()]))
        out.append(".+" if match.group(2) == ":path" else "[^/]+")
        last = match.end()
    out.append(re.escape(template[last:]))
    return "".join(out)


def _parametric_mounts(router: Any) -> list[tuple[re.Pattern[str], str]]:
    if router is None:
        return []
    try:
        return _parametric[router]
    except (KeyError, TypeError):
        pass
    found: list[tuple[str, bool]] = []
    _walk_mounts(_child_routes(router), "", found, 0)
    table = [(re.compile(_template_regex(t)), t) for t, parametric in found if "{" in t]
    with _tables_lock, contextlib.suppress(TypeError):
        _parametric[router] = table
    return table


def _legacy_template(router: Any, endpoint: Any) -> str | None:
    """Old Starlette sets only ``scope["endpoint"]``: find its route's template once."""
    if router is None:
        return None
    try:
        table = _legacy[router]
    except (KeyError, TypeError):
        table = {}
        pending = _child_routes(router)
        while pending and len(table) < 100_000:
            route = pending.pop(0)
            ep = getattr(route, "endpoint", None)
            path = getattr(route, "path_format", None) or getattr(route, "path", None)
            if ep is not None and isinstance(path, str):
                table.setdefault(ep, path)  # relative: the mount prefix comes from root_path
            elif ep is None:
                children = _child_routes(route)
                pending.extend(children)
                app = getattr(route, "app", None)
                if not children and app is not None and isinstance(path, str):
                    # a Mount of a plain ASGI app: old Starlette's scope names the app
                    table.setdefault(app, "/{path}")
        with _tables_lock, contextlib.suppress(TypeError):
            _legacy[router] = table
    return table.get(endpoint)


_MAX_DECLARED = 10_000


def has_router(app: Any) -> bool:
    """Whether an app routes its requests (a Starlette/FastAPI route table): in one that does
    not, a request is never routed, and its code is ``<unmatched>`` from the start."""
    try:
        return getattr(app, "routes", None) is not None or getattr(app, "router", None) is not None
    except Exception:  # a framework's object misbehaving: assume it routes, as before
        return True


def declared_routes(app: Any) -> set[tuple[str, str]]:
    """(method, template) of every route an app declares, read once at start-up so that the
    per-route stall counters exist at 0 before a route's first stall. Starlette and FastAPI
    route tables (``Mount``, ``include_router``); a route whose methods are not declared (a
    class endpoint, a mounted plain ASGI app) is left to its first request."""
    out: set[tuple[str, str]] = set()
    # a framework's object misbehaving costs only the zero series
    with contextlib.suppress(Exception):
        _walk_declared(_child_routes(app), "", out, 0)
    return out


def _walk_declared(routes: list[Any], prefix: str, out: set[tuple[str, str]], depth: int) -> None:
    if depth > 16:
        return
    for route in routes:
        if len(out) >= _MAX_DECLARED:
            return
        original = getattr(route, "original_router", None)
        if original is not None:  # FastAPI 0.137+: include_router keeps the router whole
            context = getattr(route, "include_context", None)
            extra = getattr(context, "prefix", "")
            _walk_declared(_child_routes(original), prefix + (extra or ""), out, depth + 1)
            continue
        if not hasattr(route, "endpoint"):  # a Mount: its path is the prefix alone
            mount = getattr(route, "path", None)
            if isinstance(mount, str):
                _walk_declared(_child_routes(route), prefix + mount, out, depth + 1)
            continue
        path = getattr(route, "path_format", None) or getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        methods = getattr(route, "methods", None)
        if methods is None:
            if "websocket" in type(route).__name__.lower():
                out.add(("WS", clip(prefix + path)))
                continue
            methods = _class_endpoint_methods(getattr(route, "endpoint", None))
        for method in methods:
            if method == "HEAD" and "GET" in methods:
                continue  # served by the GET route; one zero series is enough
            out.add((method, clip(prefix + path)))


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _class_endpoint_methods(endpoint: Any) -> set[str]:
    """The methods a class endpoint (Starlette's ``HTTPEndpoint``) answers: one handler
    method each, named in lower case; a function or anything else declares none."""
    if not isinstance(endpoint, type):
        return set()
    return {method for method in _HTTP_METHODS if callable(getattr(endpoint, method.lower(), None))}
