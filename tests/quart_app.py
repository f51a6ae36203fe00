"""A Quart app knowing nothing of loopwatch. Its blocking route's template is
``/items/<int:item_id>/block``, in Quart's own syntax."""

from __future__ import annotations

import time

from quart import Quart

app = Quart(__name__)
BLOCK_SECONDS = 0.3


@app.get("/items/<int:item_id>/block")
async def block_item(item_id: int) -> dict[str, int]:
    time.sleep(BLOCK_SECONDS)  # the blocking line
    return {"item": item_id}


@app.get("/ok")
async def ok() -> dict[str, bool]:
    return {"ok": True}
