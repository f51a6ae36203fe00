"""A server started through its console script: the wrapper pip wrote in the venv's ``bin``
is not the app's code, so it is never a stall's culprit."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import httpx

from tests.serving import serve_process, server_output

APP = """
import asyncio
import functools
import statistics

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from loopwatch import LoopWatchMiddleware


async def schedule(request):
    # the blocking work runs as a plain callback: no frame of this module is on the stack,
    # only the standard library's, uvicorn's and the console script's (CPU-bound Python: a
    # sleep in C under uvloop shows no frame at all, and looks like an idle loop)
    work = functools.partial(statistics.mean, range(5_000_000))
    asyncio.get_running_loop().call_soon(work)
    return PlainTextResponse("scheduled")


app = Starlette(routes=[Route("/schedule", schedule)])
app.add_middleware(LoopWatchMiddleware, threshold=0.2)
"""


def test_the_console_script_is_never_the_culprit(tmp_path: Path, loop_impl: str) -> None:
    (tmp_path / "wrapped_app.py").write_text(APP)
    with serve_process(
        "wrapped_app:app",
        args=("--app-dir", str(tmp_path), "--loop", loop_impl),
        console_script=True,
    ) as (url, proc):
        assert httpx.get(url + "/schedule", timeout=10).text == "scheduled"
        deadline = time.monotonic() + 15
        while "event loop blocked for" not in server_output(proc):
            assert time.monotonic() < deadline, server_output(proc)
            time.sleep(0.1)
        output = server_output(proc)
    [line] = [x for x in output.splitlines() if x.startswith("event loop blocked for")]
    culprit = re.search(r" at (.+):(\d+) in (\S+); ", line)
    assert culprit is not None, line
    # the innermost frame, as for any stack without app code: the standard library's or
    # uvicorn's, never the wrapper in bin/
    assert not culprit[1].endswith("/bin/uvicorn"), line
    assert culprit[1] == statistics.__file__, line
