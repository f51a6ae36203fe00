"""A Litestar app that knows nothing of loopwatch, served by ``loopwatch run``
(tests/e2e/test_run.py): its blocking route's template is ``/items/{item_id:int}/block``."""

from __future__ import annotations

import time
import warnings

from litestar import Litestar, get

with warnings.catch_warnings():  # the tutorial's inferred path parameter warns from 2.19
    warnings.simplefilter("ignore", DeprecationWarning)

    @get("/items/{item_id:int}/block")
    async def block_item(item_id: int) -> dict[str, int]:
        time.sleep(0.3)  # the blocking line
        return {"item": item_id}

    @get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    app = Litestar(route_handlers=[block_item, ok])
