"""An app that knows nothing of loopwatch, served by ``loopwatch run`` (tests/e2e/test_run.py):
one route that blocks the loop (``time.sleep`` in an ``async def``) and one that does not.

``python tests/runner_app.py PORT LOOP`` serves it the way a script does (``uvicorn.run``).
"""

from __future__ import annotations

import time

from fastapi import FastAPI

app = FastAPI()
BLOCK_SECONDS = 0.3


@app.get("/items/{item_id}/block")
async def block_item(item_id: int) -> dict[str, int]:
    time.sleep(BLOCK_SECONDS)  # the blocking line: the culprit every view must name
    return {"item": item_id}


@app.get("/ok")
async def ok() -> dict[str, bool]:
    return {"ok": True}


if __name__ == "__main__":
    import sys

    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop=sys.argv[2], log_level="warning")
