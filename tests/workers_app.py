"""An app for the multi-worker tests: ``uvicorn tests.workers_app:app --workers 2``."""

from __future__ import annotations

import os
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from loopwatch import LoopWatchMiddleware, metrics_app

app = FastAPI()
app.add_middleware(LoopWatchMiddleware)
app.mount("/metrics", metrics_app())


@app.get("/block/{name}")
async def block(name: str) -> dict[str, int]:
    time.sleep(0.5)  # holds this worker's loop, so the next connection goes to the other
    return {"pid": os.getpid()}


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # the culprit line the fleet view names


@app.get("/freeze/{pid}")
async def freeze(pid: int, seconds: float = 3.0) -> JSONResponse:
    """Holds the loop of worker ``pid`` only. Another worker answers 409 after a hold well
    below the threshold, so that the client's next connection goes to a worker not held."""
    global _free_at
    if pid != os.getpid() or time.monotonic() < _free_at:  # (not twice in a row)
        time.sleep(0.03)
        return JSONResponse({"pid": os.getpid()}, status_code=409)
    hold_the_loop(seconds)
    _free_at = time.monotonic() + 1.0
    return JSONResponse({"pid": os.getpid()})


_free_at = 0.0
