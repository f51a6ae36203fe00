"""What the demo's `def` routes' stalls are, against the collector's own account:
``python -m benchmarks.demo_gc [--burners 4] [--rounds 4] [--loop asyncio] [--ref REF]``.

The README's demo once showed ``POST /my-route-sync`` (a `def` route: its work sleeps in the
threadpool) with a 0.11 s ``cpu`` stall at ``starlette/requests.py:87``. This harness runs the
demo app (``demo_app.main``, threshold 0.1 s) under uvicorn with a ``gc.callbacks`` recorder
of its own (``app`` below), drives the demo's threadpool endpoints as ``make demo`` does
(``GET /sync``, ``GET /async``, ``POST /my-route-sync`` and ``GET /mixed-fast``: 300 requests
at concurrency 100, 30 at 30 for ``/async``), with ``--burners`` processes spinning on the
2 cores (the demo's run shared the machine with test runs), and ``--rounds`` fresh servers.

For every stall not on ``/async`` (the fake-async route: a stall per request, expected) it
prints its owner, kind and duration, the collector's seconds inside it per the app's own
recorder (ground truth) and per loopwatch, and the collections of 0.1 s (the threshold) or
more that no stall covered. The recorder's seconds run from the collector's start to its end:
on a busy machine they include time it waited for a core. ``--ref REF`` runs loopwatch as of git REF instead (a worktree made under /tmp), to
show what an older version said about the same holds. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# -- the app: the demo app and the collector's own account -------------------------------


def _app() -> Any:
    from demo_app.main import app
    from tests.gc_truth import GcTruth

    recorder = GcTruth(0.01).start()

    @app.get("/gc-truth")
    def truth() -> list[tuple[Any, ...]]:
        return [tuple(c) for c in recorder.collections]

    return app


if os.environ.get("DEMO_GC_APP"):
    app = _app()

# -- the harness ------------------------------------------------------------------------

PHASES = [("GET", "/sync", 300, 100), ("GET", "/async", 30, 30),
          ("POST", "/my-route-sync", 300, 100), ("GET", "/mixed-fast", 300, 100)]  # fmt: skip


def _burn() -> None:
    while True:
        pass


def _get(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as answer:
        return json.loads(answer.read())


def one_round(root: Path, loop: str, burners: int) -> tuple[list[dict[str, Any]], list[Any]]:
    from benchmarks.serving import free_port, wait_up
    from loopwatch.cli.load import Endpoint, drive

    port = free_port()
    # root's loopwatch and demo app, this checkout's harness
    links = Path(tempfile.mkdtemp(prefix="demo-gc-"))
    for name, where in (
        ("loopwatch", root),
        ("demo_app", root),
        ("benchmarks", ROOT),
        ("tests", ROOT),
    ):
        (links / name).symlink_to(where / name)
    env = {**os.environ, "DEMO_GC_APP": "1", "DEMO_WORK_SECONDS": "0.5", "PYTHONPATH": str(links)}
    command = [sys.executable, "-m", "uvicorn", "benchmarks.demo_gc:app", "--port", str(port),
               "--loop", loop, "--log-level", "warning", "--no-access-log"]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=links, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_up(base + "/gc-truth", proc, log)
            spinning = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(burners)]
            for burner in spinning:
                burner.start()
            try:
                for method, path, requests, concurrency in PHASES:
                    endpoint = Endpoint(method, path, "fix", "")
                    asyncio.run(
                        drive("127.0.0.1", port, endpoint, requests, concurrency, lambda: None)
                    )
            finally:
                for burner in spinning:
                    burner.terminate()
            time.sleep(1.0)  # the ring fills as holds close
            stalls = _get(base + "/metrics/stalls")
            truth = _get(base + "/gc-truth")
        finally:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(links)  # the links only
    return (stalls if isinstance(stalls, list) else stalls["stalls"]), truth


def _worktree(ref: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="loopwatch-ref-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(path), ref],
                   check=True, capture_output=True)  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burners", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    parser.add_argument("--ref", help="git ref of loopwatch to run instead of this checkout")
    args = parser.parse_args()
    root = _worktree(args.ref) if args.ref else ROOT
    try:
        _run(args, root)
    finally:
        if root != ROOT:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root)],
                           check=False, capture_output=True)  # fmt: skip


def _run(args: argparse.Namespace, root: Path) -> None:
    print(f"loopwatch at {args.ref or 'this checkout'}, uvicorn --loop {args.loop}, "
          f"{args.burners} burners, {args.rounds} rounds")  # fmt: skip
    seen = covered = gc_kind = 0
    for n in range(args.rounds):
        stalls, truth = one_round(root, args.loop, args.burners)
        long = [c for c in truth if c[1] >= 0.05]
        print(f"round {n}: {len(stalls)} stalls; collections of 50 ms or more: "
              + ", ".join(f"{s:.3f} s gen {g} on {t}" for _, s, g, t in long))  # fmt: skip
        hit = set()
        for stall in stalls:
            start, end = stall["started_at"], stall["started_at"] + stall["duration"]
            inside = [
                (max(0.0, min(w + s, end) - max(w, start)), i)
                for i, (w, s, _, _) in enumerate(truth)
            ]
            hit |= {i for o, i in inside if o > 0}  # /async's own stalls cover some too
            if stall["route"] == "/async":
                continue
            truth_gc = sum(o for o, _ in inside)
            seen += 1
            covered += truth_gc >= 0.5 * stall["duration"]
            gc_kind += stall["kind"] == "gc"
            print(f"  stall {stall['method']} {stall['route']}: {stall['kind']}, "
                  f"{stall['duration']:.3f} s, collector {truth_gc:.3f} s (app) / "
                  f"{stall.get('gc_seconds', 'n/a')} (loopwatch), at {stall['culprit'][-60:]}")  # fmt: skip
        missed = [c for i, c in enumerate(truth) if c[1] >= 0.1 and i not in hit]
        for _, seconds, generation, thread in missed:
            print(f"  no stall for a {seconds:.3f} s collection (gen {generation}, {thread})")
    print(f"stalls off /async: {seen}; the collector ran for most of it: {covered}; "
          f"kind gc: {gc_kind}")  # fmt: skip


if __name__ == "__main__":
    main()
