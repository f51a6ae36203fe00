"""An app for the multi-worker tests: ``uvicorn tests.workers_app:app --workers 2``."""

from __future__ import annotations

import os
import time

from fastapi import FastAPI

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
