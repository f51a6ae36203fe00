"""Unit tests of the attribute stage: who owns what the loop thread runs, read from real
frames and handles while they run (here synchronously, with no loop running)."""

from __future__ import annotations

import asyncio
import contextvars
import sys
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
import uvicorn.server

from loopwatch.attribute import Attributor, Owner, ServerCode, running_callback_owner
from loopwatch.requests import RequestRecord, bind_request, own_context, own_owner, unbind_request
from loopwatch.stall import SERVER

Read = Callable[[FrameType], Any]


def in_handle(read: Read, context: contextvars.Context, protocol: bool = False) -> Any:
    """Run a real ``asyncio.Handle`` whose callback (a plain function, or a protocol's method)
    reads its own frame as the watchdog reads the loop thread's while the callback holds the
    loop; returns what it read."""
    seen: list[Any] = []

    class Blocking(asyncio.Protocol):
        def hold(self) -> None:
            seen.append(read(sys._getframe()))

    def callback() -> None:
        seen.append(read(sys._getframe()))

    loop = asyncio.new_event_loop()
    try:
        target = Blocking().hold if protocol else callback
        asyncio.Handle(target, (), loop, context=context)._run()
    finally:
        loop.close()
    [result] = seen
    return result


def request_context(record: RequestRecord) -> contextvars.Context:
    """The context of a task that bound ``record``, as the middleware binds a request."""

    async def bind() -> contextvars.Context:
        bind_request(record)
        return contextvars.copy_context()

    return asyncio.run(bind())


def owner_now(frame: FrameType) -> RequestRecord | str | None:
    return running_callback_owner(frame, ServerCode(), frozenset())


def test_a_callback_scheduled_in_a_requests_context_is_the_requests() -> None:
    record = RequestRecord("GET", {}, "")
    assert in_handle(owner_now, request_context(record)) is record


def test_a_protocol_method_with_no_request_is_the_servers() -> None:
    assert in_handle(owner_now, contextvars.Context(), protocol=True) == SERVER


def test_a_plain_callback_with_no_request_is_background() -> None:
    assert in_handle(owner_now, contextvars.Context()) is None


def test_with_no_handle_the_outermost_frame_in_the_loop_tells_the_server() -> None:
    # a C loop (uvloop) calls the protocol's method with no Handle frame: the frame that
    # called into the loop is where the callback's chain ends
    seen: list[Any] = []

    class Protocol(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            seen.append(running_callback_owner(sys._getframe(), ServerCode(), entry))

    def loop_entry() -> None:
        Protocol().data_received(b"x")

    entry = frozenset({loop_entry.__code__})
    loop_entry()
    assert seen == [SERVER]


def test_the_servers_own_code_is_told_by_its_package() -> None:
    code = ServerCode()
    assert code.is_server(uvicorn.server.Server.serve.__code__)
    assert not code.is_server(test_the_servers_own_code_is_told_by_its_package.__code__)


def attribute(own: RequestRecord) -> Read:
    loop = asyncio.new_event_loop()
    loop.close()  # not running: no current task, as in a plain callback

    def read(frame: FrameType) -> Owner:
        return Attributor(loop, own, lambda: frame, frozenset).owner()

    return read


def test_an_owner_is_a_requests_route_or_its_placeholder_before_routing() -> None:
    own = own_owner()
    for routed, expected in ((True, "<routing>"), (False, "<unmatched>")):
        record = RequestRecord("POST", {}, "", routed=routed)
        owner = in_handle(attribute(own), request_context(record))
        assert owner.record is record and owner.label == ("POST", expected)
        assert owner.booked and not owner.background
    mine = in_handle(attribute(own), own_context(own))
    assert not mine.booked and mine.label == ("-", "<loopwatch>")
    nobody = in_handle(attribute(own), contextvars.Context())
    assert nobody.label == ("-", "<background>") and nobody.background
    server = in_handle(attribute(own), contextvars.Context(), protocol=True)
    assert server.label == ("-", "<server>") and not server.background


def test_binding_and_unbinding_leave_the_context_as_it_was() -> None:
    record = RequestRecord("GET", {}, "")

    async def bound_then_unbound() -> contextvars.Context:
        unbind_request(bind_request(record))
        return contextvars.copy_context()

    assert in_handle(owner_now, asyncio.run(bound_then_unbound())) is None


def test_a_tasks_request_is_bound_and_unbound_and_nested_bindings_restore() -> None:
    from loopwatch.requests import owner_of

    outer, inner = RequestRecord("GET", {}, ""), RequestRecord("POST", {}, "")

    async def main() -> list[RequestRecord | None]:
        task = asyncio.current_task()
        seen = [owner_of(task)]
        first = bind_request(outer)
        seen.append(owner_of(task))
        second = bind_request(inner)  # a mounted app's own middleware, inside the first
        seen.append(owner_of(task))
        unbind_request(second)
        seen.append(owner_of(task))
        unbind_request(first)
        seen.append(owner_of(task))
        return seen

    assert asyncio.run(main()) == [None, outer, inner, outer, None]


class _Gone:
    """A task gone without unbinding, as its binding's weak reference sees it."""


def _bound_by_a_gone_task(record: RequestRecord) -> asyncio.Task[object]:
    """The current task, with ``record`` bound under its id as a task gone without unbinding
    leaves it (Python < 3.12: a plain dict keyed by id, and a dead weak reference), as if this
    task had reused the gone one's id."""
    from loopwatch import requests

    if requests.HAS_TASK_CONTEXT:
        pytest.skip("3.12+ reads the task's own context")
    task = asyncio.current_task()
    assert task is not None
    requests._bound[id(task)] = (record, weakref.ref(_Gone()))  # dead at once
    return task


def test_a_binding_left_by_a_dead_task_is_not_a_new_tasks_with_its_id() -> None:
    # no weak-keyed entry per request on Python < 3.12: a task gone without unbinding must
    # not lend its request to the next task that gets its id
    from loopwatch import requests

    async def main() -> RequestRecord | None:
        task = _bound_by_a_gone_task(RequestRecord("GET", {}, ""))
        try:
            return requests.owner_of(task)
        finally:
            requests._bound.pop(id(task), None)

    assert asyncio.run(main()) is None


def test_a_binding_a_gone_task_left_is_not_restored_for_a_new_task_with_its_id() -> None:
    # a request whose unbinding never ran left its record under its task's id; a new task
    # given that id binds and unbinds a request of its own: the stale record is dropped, not
    # restored (it would stay for good, and keep its request alive)
    from loopwatch import requests

    async def main() -> object:
        task = _bound_by_a_gone_task(RequestRecord("GET", {}, ""))
        unbind_request(bind_request(RequestRecord("POST", {}, "")))
        return requests._bound.get(id(task))

    assert asyncio.run(main()) is None
