"""Route templates read from the scope: FastAPI and Starlette shapes, old-Starlette fallback,
parametric mounts, and a property test against Starlette's own matching."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from loopwatch import UNMATCHED, LoopWatchMiddleware
from loopwatch.routes import route_template
from tests.helpers import series


def labels_of(app: Any, registry: CollectorRegistry) -> set[str]:
    return {s["route"] for s in series(registry, "loopwatch_requests_total")}


def test_parametric_mount_maps_back_to_its_template() -> None:
    registry = CollectorRegistry()
    tenant_app = FastAPI()

    @tenant_app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        return {"order_id": order_id}

    app = FastAPI()
    app.mount("/t/{tenant}", tenant_app)
    app.add_middleware(LoopWatchMiddleware, registry=registry)
    with TestClient(app) as client:
        for tenant in ("acme", "globex", "initech"):
            assert client.get(f"/t/{tenant}/orders/1").status_code == 200
    assert labels_of(app, registry) == {"/t/{tenant}/orders/{order_id}"}


def test_nested_mounts_and_included_routers() -> None:
    registry = CollectorRegistry()

    async def leaf(request: Request) -> PlainTextResponse:
        return PlainTextResponse("leaf")

    deep = Starlette(routes=[Mount("/deep", routes=[Route("/z/{q}", leaf)])])
    api = APIRouter(prefix="/api")
    users = APIRouter(prefix="/users")

    @users.get("/{user_id}/posts/{post_id}")
    async def post(user_id: int, post_id: int) -> dict[str, int]:
        return {}

    api.include_router(users)
    app = FastAPI()
    app.include_router(api)
    app.mount("/legacy", deep)
    app.add_middleware(LoopWatchMiddleware, registry=registry)
    with TestClient(app) as client:
        assert client.get("/legacy/deep/z/1").text == "leaf"
        assert client.get("/api/users/1/posts/2").status_code == 200
        assert client.get("/legacy/nowhere").status_code == 404
    assert labels_of(app, registry) == {
        "/legacy/deep/z/{q}",
        "/api/users/{user_id}/posts/{post_id}",
        UNMATCHED,
    }


def test_root_path_is_not_part_of_the_template() -> None:
    registry = CollectorRegistry()
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {}

    app.add_middleware(LoopWatchMiddleware, registry=registry)
    with TestClient(app, root_path="/behind-proxy") as client:
        assert client.get("/items/3").status_code == 200
    assert labels_of(app, registry) == {"/items/{item_id}"}


class _OldRoute:
    """A route as old Starlette had it: only ``scope["endpoint"]`` is written on dispatch."""

    def __init__(self, path: str, endpoint: Any) -> None:
        self.path = path
        self.endpoint = endpoint


class _OldRouter:
    def __init__(self, routes: list[Any]) -> None:
        self.routes = routes


def test_old_starlette_falls_back_to_a_table_built_once() -> None:
    def endpoint() -> None: ...

    router = _OldRouter([_OldRoute("/a", lambda: None), _OldRoute("/b/{x}", endpoint)])
    scope = {"router": router, "endpoint": endpoint, "root_path": "", "method": "GET"}
    assert route_template(scope, "") == "/b/{x}"
    router.routes.clear()  # the table is cached: no second walk
    assert route_template(scope, "") == "/b/{x}"
    assert route_template({"router": router, "root_path": ""}, "") is None


def test_a_partial_match_is_unmatched() -> None:
    route = Route("/only-post", lambda r: None, methods=["POST"])
    assert route_template({"route": route, "method": "GET", "root_path": ""}, "") is None
    assert route_template({"route": route, "method": "POST", "root_path": ""}, "") == "/only-post"


# -- property: our label is the template of the route Starlette itself dispatched to ------

segment = st.one_of(
    st.sampled_from(["a", "b", "users", "v1", "x-y"]),
    st.sampled_from(["{p}", "{q:int}", "{r:str}"]),
)
template = st.lists(segment, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))


def _unique_params(path: str, n: int) -> str:
    """Starlette rejects a template that repeats a parameter name: number them."""
    counter = iter(range(100))
    return re.sub(
        r"\{([a-z])(:[a-z]+)?\}",
        lambda m: "{" + f"{m[1]}{n}_{next(counter)}" + (m[2] or "") + "}",
        path,
    )


def _fill(path: str, rng: st.DataObject) -> str:
    out = []
    for part in path.strip("/").split("/"):
        if part.startswith("{"):
            out.append(
                str(rng.draw(st.integers(0, 999)))
                if ":int" in part
                else rng.draw(st.sampled_from(["a", "7", "zed", "users"]))
            )
        else:
            out.append(part)
    return "/" + "/".join(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    templates=st.lists(template, min_size=1, max_size=6, unique=True),
    mount=st.sampled_from(["", "/m", "/t/{tenant}"]),
    data=st.data(),
)
def test_label_matches_starlette_dispatch(
    templates: list[str], mount: str, data: st.DataObject
) -> None:
    routes = []
    for i, raw in enumerate(templates):
        path = _unique_params(raw, i)
        full = (
            (mount + Route(path, lambda r: None).path_format)
            if mount
            else Route(path, lambda r: None).path_format
        )

        async def endpoint(request: Request, full: str = full) -> PlainTextResponse:
            return PlainTextResponse(full)

        routes.append(Route(path, endpoint))
    registry = CollectorRegistry()
    app = Starlette(routes=[Mount(mount, routes=routes)] if mount else routes)
    app.add_middleware(LoopWatchMiddleware, registry=registry)
    target = data.draw(st.sampled_from(routes))
    concrete = _fill(target.path, data)
    if mount:
        concrete = mount.replace("{tenant}", data.draw(st.sampled_from(["acme", "x"]))) + concrete
    with TestClient(app) as client:
        response = client.get(concrete, follow_redirects=False)
    labels = labels_of(app, registry)
    if response.status_code == 200:
        assert labels == {response.text}  # Starlette's choice, as the endpoint knows it
    else:
        assert labels == {UNMATCHED}


def test_parametric_mount_of_a_plain_asgi_app_is_one_series() -> None:
    registry = CollectorRegistry()

    async def files(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"f"})

    app = Starlette(routes=[Mount("/tenants/{tenant}", app=files)])
    app.add_middleware(LoopWatchMiddleware, registry=registry)
    with TestClient(app) as client:
        for tenant in ("a1", "b2", "c3"):
            assert client.get(f"/tenants/{tenant}/x/y").text == "f"
    assert labels_of(app, registry) == {"/tenants/{tenant}/{path}"}
