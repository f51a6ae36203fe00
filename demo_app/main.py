"""The seed article's FastAPI app: fake-async endpoints and their fixes, with loopwatch."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from demo_app.work import crunch_numbers, llm_call, parse_file, sync_lookup, work_seconds
from loopwatch import LoopWatchMiddleware, metrics_app

app = FastAPI(title="loopwatch demo: stop using async in FastAPI (unless you mean it)")
app.add_middleware(LoopWatchMiddleware)
app.mount("/metrics", metrics_app())


@app.get("/sync")
def sync_endpoint() -> dict[str, str]:
    time.sleep(work_seconds())  # blocks, but in a thread
    return {"endpoint": "sync"}


@app.get("/async")
async def async_endpoint() -> dict[str, str]:
    time.sleep(work_seconds())  # blocks the event loop
    return {"endpoint": "async"}


@app.post("/my-route")
async def my_endpoint() -> dict[str, float]:
    return parse_file()  # fake async: runs on the loop thread


@app.post("/my-route-sync")
def my_endpoint_sync() -> dict[str, float]:
    return parse_file()  # the fix: FastAPI runs def endpoints in its threadpool


@app.post("/mixed")
async def mixed_endpoint() -> dict[str, object]:
    parsed = parse_file()  # blocking
    answer = await llm_call()  # true async
    return {"parsed": parsed, "answer": answer}


@app.get("/mixed-fast")
async def mixed_fast_endpoint() -> dict[str, object]:
    parsed = await run_in_threadpool(parse_file)  # no loop blocking
    answer = await llm_call()
    return {"parsed": parsed, "answer": answer}


@app.get("/async-sleep")
async def well_behaved_endpoint() -> dict[str, str]:
    await asyncio.sleep(work_seconds())  # really asynchronous: the loop stays free
    return {"endpoint": "async-sleep"}


@app.get("/cpu")
async def cpu_endpoint() -> dict[str, float]:
    return crunch_numbers()  # CPU-bound on the loop: needs a process pool, not a thread


@app.get("/cuts")
async def cuts_endpoint() -> dict[str, float]:
    return sync_lookup()  # ~10 ms on the loop per request: never a stall, yet it fills the loop


@app.get("/cuts-fixed")
def cuts_fixed_endpoint() -> dict[str, float]:
    return sync_lookup()  # the fix: a def endpoint runs in FastAPI's threadpool
