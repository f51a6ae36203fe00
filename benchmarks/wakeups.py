"""The floor under loopwatch's idle cost: what 100 wake-ups a second cost on this machine.

``python -m benchmarks.wakeups [--seconds 20] [--interval 0.01]`` runs one process per
mechanism (none, a ``loop.call_later`` chain, a task looping on ``asyncio.sleep``, a thread
looping on ``Event.wait``, and the task plus the thread, which is loopwatch's shape) and
prints each one's CPU use in % of one core. On a VM a timer wake-up can cost tens of
microseconds, which no Python code can win back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading

MODES = ("none", "call_later", "sleep-task", "thread", "task+thread")


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


async def _probe(mode: str, seconds: float, interval: float) -> float:
    loop = asyncio.get_running_loop()
    if mode in ("sleep-task", "task+thread"):

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)

        task = loop.create_task(beat())
    if mode == "call_later":

        def tick() -> None:
            loop.call_later(interval, tick)

        loop.call_later(interval, tick)
    stop = threading.Event()
    if mode in ("thread", "task+thread"):

        def watch() -> None:
            while not stop.wait(interval):
                pass

        threading.Thread(target=watch, daemon=True).start()
    await asyncio.sleep(1.0)  # settle
    before = _cpu()
    await asyncio.sleep(seconds)
    used = _cpu() - before
    stop.set()
    if mode in ("sleep-task", "task+thread"):
        task.cancel()
    return used / seconds * 100


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wakeups", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--cpu", default="0", help="pin every probe to this CPU (taskset)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:  # one probe, in its own process
        try:
            import uvloop

            percent = uvloop.run(_probe(args.mode, args.seconds, args.interval))
        except ImportError:
            percent = asyncio.run(_probe(args.mode, args.seconds, args.interval))
        print(f"{percent:.3f}")
        return
    pin = ["taskset", "-c", args.cpu] if args.cpu else []
    probes = {
        mode: subprocess.Popen(
            [
                *pin,
                sys.executable,
                "-m",
                "benchmarks.wakeups",
                "--mode",
                mode,
                "--seconds",
                str(args.seconds),
                "--interval",
                str(args.interval),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for mode in MODES
    }
    print(f"| wake-ups every {args.interval:g} s | % of one core |\n|---|---:|")
    for mode, proc in probes.items():
        out, _ = proc.communicate()
        print(f"| {mode} | {float(out.strip()):.2f}% |")


if __name__ == "__main__":
    main()
