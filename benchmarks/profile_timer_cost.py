"""What the profile's CPU-time timer costs the loop thread: ``python -m
benchmarks.profile_timer_cost``.

A loop on the main thread (``asyncio.run``, where the timer is armed) does fixed chunks of
Python work for ``--cpu-seconds`` of its thread's CPU time, with a monitor whose profile is on,
then off, ``--rounds`` times alternating. Prints the work done per CPU-second, on against off
(the median of each), and the samples the timer took per CPU-second. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

from loopwatch import Settings
from loopwatch.monitor import Monitor


def chunk() -> int:
    total = 0
    for i in range(2000):
        total += i
    return total


async def work(profile: bool, cpu_seconds: float) -> tuple[int, int]:
    monitor = Monitor(asyncio.get_running_loop(), Settings.resolve(env={}, profile=profile))
    monitor.acquire("bench")
    try:
        done, started = 0, time.thread_time()
        while time.thread_time() - started < cpu_seconds:
            for _ in range(50):
                chunk()
            done += 1
            await asyncio.sleep(0)
        sampler = monitor.pipeline._sampler
        timer = sampler._timer if sampler is not None else None
        return done, timer.samples if timer is not None else 0
    finally:
        monitor.release("bench")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_timer_cost")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cpu-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    done: dict[bool, list[int]] = {True: [], False: []}
    samples = []
    for _ in range(args.rounds):
        for profile in (False, True):
            count, taken = asyncio.run(work(profile, args.cpu_seconds))
            done[profile].append(count)
            if profile:
                samples.append(taken / args.cpu_seconds)
    ratio = statistics.median(done[True]) / statistics.median(done[False])
    print(f"work per CPU-second, profile on / off: {ratio:.4f} (chunks: on {done[True]}, "
          f"off {done[False]}); timer samples per CPU-second: {statistics.median(samples):.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
