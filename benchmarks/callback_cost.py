"""What timing uvloop's plain callbacks costs (Python 3.12+): ``python -m benchmarks.callback_cost``.

In one process, on a real uvloop loop with the real loop-time hook (``start_accounting``), the
time per call of:

- ``call_soon`` of a C callable (what every task wakeup does: asyncio's C tasks call
  ``loop.call_soon``), and of a Python function, on the watched loop; and on a loop nobody
  watches while the wrapper is installed (one set lookup);
- one trip of a task through ``await asyncio.sleep(0)`` (one ``call_soon``, a step), and
  through a future a C callback sets (``call_soon(future.set_result, None)``, the future's
  ``call_soon`` of the task's wakeup, a step);
- one run of a trivial Python callback (``call_soon`` plus its run: the hook's two events).

Each against the same loop with loop time off ("bare") and with the ``sys.monitoring`` hook
on but uvloop's methods not wrapped ("steps only": loopwatch before callbacks were timed).
The best chunk of 2,000 calls over ``--repeat`` interleaved rounds (the machine may be
shared); prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable

import uvloop

from loopwatch.accounting import Accountant, monitoring_hook, start_accounting


def _sink(key: tuple[str, str], seconds: float) -> None:
    pass


def _python_callback() -> None:
    pass


CHUNK = 2_000  # calls timed together; the best chunk counts (a shared machine's noise)


async def _per_call(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(max(1, n // CHUNK)):
        started = time.perf_counter()
        for _ in range(CHUNK):
            fn()
        best = min(best, time.perf_counter() - started)
        await asyncio.sleep(0)  # let the loop run what was scheduled
    return best / CHUNK


async def _trips(n: int) -> float:
    best = float("inf")
    for _ in range(max(1, n // CHUNK)):
        started = time.perf_counter()
        for _ in range(CHUNK):
            await asyncio.sleep(0)
        best = min(best, time.perf_counter() - started)
    return best / CHUNK


async def _future_trips(n: int) -> float:
    loop = asyncio.get_running_loop()
    best = float("inf")
    for _ in range(max(1, n // CHUNK)):
        started = time.perf_counter()
        for _ in range(CHUNK):
            future = loop.create_future()
            loop.call_soon(future.set_result, None)
            await future
        best = min(best, time.perf_counter() - started)
    return best / CHUNK


async def _callback_chain(calls: int) -> float:
    """A Python callback that schedules itself ``calls`` times: seconds for all of them."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [calls]

    def callback() -> None:
        left[0] -= 1
        if left[0]:
            loop.call_soon(callback)
        else:
            done.set_result(time.perf_counter())

    started = time.perf_counter()
    loop.call_soon(callback)
    return await done - started  # type: ignore[no-any-return]


async def _callbacks(n: int) -> float:
    return min([await _callback_chain(CHUNK) for _ in range(max(1, n // CHUNK))]) / CHUNK


async def _measure(n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    out: dict[str, float] = {}
    out["call_soon(C callable)"] = await _per_call(lambda: loop.call_soon(len, ()), n)
    out["call_soon(Python function)"] = await _per_call(lambda: loop.call_soon(_python_callback), n)
    out["task trip through sleep(0)"] = await _trips(n)
    out["task trip through a future set by a callback"] = await _future_trips(n)
    out["Python callback, scheduled and run"] = await _callbacks(n)
    return out


async def _variant(mode: str, n: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    accountant = None
    if mode != "bare":
        accountant = start_accounting(loop, _sink, force="monitoring")
        assert accountant is not None
        if mode == "steps only":
            hook = monitoring_hook()
            assert hook is not None
            hook._callbacks.remove(loop)  # uvloop's own methods: no callback is hooked
    try:
        return await _measure(n)
    finally:
        if accountant is not None:
            accountant.stop()


def _unwatched(n: int) -> float:
    """``call_soon`` on a loop nobody watches while another (watched) loop has the wrapper
    installed: per call."""
    watched = uvloop.new_event_loop()
    accountant = watched.run_until_complete(_start(watched))
    try:
        other = uvloop.new_event_loop()
        try:
            return other.run_until_complete(_per_call(lambda: other.call_soon(len, ()), n))
        finally:
            other.close()
    finally:
        accountant.stop()
        watched.close()


async def _start(loop: asyncio.AbstractEventLoop) -> Accountant:
    accountant = start_accounting(loop, _sink, force="monitoring")
    assert accountant is not None
    return accountant


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if sys.version_info < (3, 12):
        raise SystemExit("uvloop's callbacks are timed with sys.monitoring: Python 3.12+")
    modes = ("bare", "steps only", "callbacks too")
    best: dict[str, dict[str, float]] = {mode: {} for mode in modes}
    unwatched: list[float] = []
    for _ in range(args.repeat):
        for mode in modes:  # interleaved: load changes hit every variant alike
            got = uvloop.run(_variant(mode, args.calls))
            for key, value in got.items():
                best[mode][key] = min(value, best[mode].get(key, value))
        unwatched.append(_unwatched(args.calls))
    print(f"Python {sys.version.split()[0]}, uvloop {uvloop.__version__}, ns per call: the "
          f"best chunk of {CHUNK} over {args.repeat} rounds of {args.calls}\n")  # fmt: skip
    print("| what | bare | steps only | callbacks too | callbacks' cost |")
    print("|---|---:|---:|---:|---:|")
    for key in best["bare"]:
        ns = [best[mode][key] * 1e9 for mode in modes]
        print(f"| {key} | {ns[0]:.0f} | {ns[1]:.0f} | {ns[2]:.0f} | {ns[2] - ns[1]:+.0f} |")
    bare = best["bare"]["call_soon(C callable)"] * 1e9
    print(f"| call_soon(C callable), a loop nobody watches, wrapper installed | {bare:.0f} | "
          f"| {min(unwatched) * 1e9:.0f} | {min(unwatched) * 1e9 - bare:+.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
