"""A plain asyncio program, no web framework, knowing nothing of loopwatch unless told
(``LOOPWATCH_DEMO_WATCH=1``: it calls ``loopwatch.watch()`` itself). A consumer task takes
jobs from a queue; one job in three blocks the loop (``time.sleep``) for 0.3 s. It prints
``ready`` once it runs, then runs until killed.

``python tests/plain_service.py``
"""

from __future__ import annotations

import asyncio
import os
import time


async def consume(queue: asyncio.Queue[int]) -> None:
    while True:
        job = await queue.get()
        if job % 3 == 0:
            time.sleep(0.3)  # the blocking line
        queue.task_done()


async def produce(queue: asyncio.Queue[int]) -> None:
    job = 0
    while True:
        await queue.put(job)
        job += 1
        await asyncio.sleep(0.2)


async def main() -> None:
    if os.environ.get("LOOPWATCH_DEMO_WATCH") == "1":
        import loopwatch

        loopwatch.watch()
    queue: asyncio.Queue[int] = asyncio.Queue()
    print("ready", flush=True)
    await asyncio.gather(consume(queue), produce(queue))


if __name__ == "__main__":
    asyncio.run(main())
