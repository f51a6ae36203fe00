"""An aiohttp app knowing nothing of loopwatch. Its blocking route's template is
``/items/{item_id}/block``. ``python tests/aiohttp_app.py PORT`` serves it with
``web.run_app``, as a service does."""

from __future__ import annotations

import time

from aiohttp import web

BLOCK_SECONDS = 0.3


async def block_item(request: web.Request) -> web.Response:
    time.sleep(BLOCK_SECONDS)  # the blocking line
    return web.json_response({"item": request.match_info["item_id"]})


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/items/{item_id}/block", block_item)
    app.router.add_get("/ok", ok)
    return app


if __name__ == "__main__":
    import sys

    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
