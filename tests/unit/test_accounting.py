"""Loop-time accounting's own bookkeeping, without a server: what a finished request leaves
behind until its last seconds are booked."""

from __future__ import annotations

import asyncio
import gc
import weakref

from loopwatch.accounting import Accountant
from loopwatch.requests import RequestRecord


class _Part:
    """Stands for what a request's scope holds (headers, state, path parameters)."""


def test_a_finished_request_waits_for_its_booking_without_its_scope() -> None:
    # A finished record waits up to a quarter of a second for the next drain. Kept with its
    # scope, every request's objects outlived it: three times the collections and ~8 µs a
    # request (benchmarks.inprocess, loop time on). Its route is read first, and booked.
    booked: list[tuple[tuple[str, str], float]] = []
    loop = asyncio.new_event_loop()
    try:
        accountant = Accountant(loop, lambda key, seconds: booked.append((key, seconds)), "handle")
        part = _Part()
        gone = weakref.ref(part)
        scope = {"type": "http", "method": "GET", "path": "/x", "part": part}
        record = RequestRecord("GET", scope, "", routed=False)
        record.busy = 0.25
        del scope, part
        accountant.finished_request(record)
        gc.collect()
        assert gone() is None, "the scope outlived its request"
        assert list(accountant.finished) == [record]
        accountant.drain([])
        assert booked == [(("GET", "<unmatched>"), 0.25)]
    finally:
        loop.close()


def test_a_callback_loop_time_cannot_label_still_runs() -> None:
    """The Handle hook labels an ownerless callback before it runs it: whatever that reading
    meets (a callable whose ``__self__`` raises), the app's callback runs and the loop goes
    on."""
    from loopwatch.accounting import start_accounting

    ran: list[bool] = []

    class Odd:
        @property
        def __self__(self) -> object:
            raise RuntimeError("no self here")

        def __call__(self) -> None:
            ran.append(True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        accountant = start_accounting(loop, lambda key, seconds: None, loop_frame=lambda: None)
        assert accountant is not None and accountant.kind == "handle"
        try:
            loop.call_soon(Odd())
            await asyncio.sleep(0.01)
        finally:
            accountant.stop()

    asyncio.run(main())
    assert ran == [True]
