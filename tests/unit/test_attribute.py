"""Unit tests of the attribute stage: who owns what the loop thread runs, read from real
frames and handles while they run (here synchronously, with no loop running)."""

from __future__ import annotations

import asyncio
import contextvars
import sys
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

        def owner() -> RequestRecord | None:  # before 3.12, read from this thread's stack
            return owner_of(task, sys._getframe)

        seen = [owner()]
        first = bind_request(outer)
        seen.append(owner())
        second = bind_request(inner)  # a mounted app's own middleware, inside the first
        seen.append(owner())
        unbind_request(second)
        seen.append(owner())
        unbind_request(first)
        seen.append(owner())
        return seen

    assert asyncio.run(main()) == [None, outer, inner, outer, None]


def test_a_request_bound_to_its_task_is_read_back_and_nested_bindings_restore() -> None:
    # loop time off: bound in a table, not the context (no ContextVar.set per request)
    from loopwatch.requests import CURRENT_REQUEST, bind_to_task, owner_of, unbind_from_task

    outer, inner = RequestRecord("GET", {}, ""), RequestRecord("POST", {}, "")

    async def main() -> tuple[list[RequestRecord | None], bool]:
        task = asyncio.current_task()
        seen = [owner_of(task)]
        first = bind_to_task(outer)
        held = CURRENT_REQUEST in contextvars.copy_context()
        seen.append(owner_of(task))
        second = bind_to_task(inner)
        seen.append(owner_of(task))
        unbind_from_task(second)
        seen.append(owner_of(task))
        unbind_from_task(first)
        seen.append(owner_of(task))
        return seen, held

    seen, held = asyncio.run(main())
    assert seen == [None, outer, inner, outer, None]
    assert not held  # the task's context never holds loopwatch's variable


def test_a_task_left_bound_when_its_loop_stops_is_let_go() -> None:
    from loopwatch import requests

    loop = asyncio.new_event_loop()
    record = RequestRecord("GET", {}, "")

    async def abandoned() -> None:  # its request never ends: the loop closes under it
        requests.bind_to_task(record)
        await asyncio.Event().wait()

    try:
        requests.bind_by_task(loop, True)
        task = loop.create_task(abandoned())
        loop.run_until_complete(asyncio.sleep(0.01))
        assert requests.task_bound(task) is record
        requests.bind_by_task(loop, False)  # what the monitor does as it stops
        assert requests.task_bound(task) is None
    finally:
        task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def test_the_stack_names_the_request_by_the_innermost_frame_that_bound_one() -> None:
    # Python < 3.12 on a C loop: no Handle frame, and the request's own task was created by
    # the server before any request: the frame that bound it is read off the stack
    from loopwatch.requests import binds_in, stack_owner

    outer, inner = RequestRecord("GET", {}, ""), RequestRecord("POST", {}, "")
    seen: list[RequestRecord | None] = []

    def handler() -> None:
        seen.append(stack_owner(sys._getframe()))

    def binding(record: RequestRecord, then: Callable[[], None]) -> None:
        held = record  # the local the frame is registered with
        then()
        del held

    def passing_through(then: Callable[[], None]) -> None:  # bound nothing (yet): read on
        then()

    binds_in(binding, "held")
    binds_in(passing_through, "held")
    binding(outer, handler)
    binding(outer, lambda: binding(inner, handler))
    binding(outer, lambda: passing_through(handler))
    handler()
    assert seen == [outer, inner, outer, None]


def test_the_running_handle_ends_the_walk_up_the_stack() -> None:
    # a loop run inside a request's code (nest_asyncio): the step running in it is the inner
    # Handle's, whatever request the frames below it serve
    from loopwatch.requests import binds_in, stack_owner

    outer, inner = RequestRecord("GET", {}, ""), RequestRecord("POST", {}, "")

    def binding(record: RequestRecord, then: Callable[[], object]) -> object:
        held = record  # the local the frame is registered with
        found = then()
        del held
        return found

    binds_in(binding, "held")
    assert binding(outer, lambda: in_handle(stack_owner, contextvars.Context())) is None
    inners = request_context(inner)
    assert binding(outer, lambda: in_handle(stack_owner, inners)) is inner


@pytest.mark.parametrize("task_context", [False, True])
def test_only_a_c_loop_before_312_gets_a_task_factory(
    task_context: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a pure-Python loop's Handle carries each step's context, and 3.12+ reads a task's own:
    # the factory (a Python call per task) is for uvloop before 3.12 only
    import uvloop

    from loopwatch import requests

    monkeypatch.setattr(requests, "HAS_TASK_CONTEXT", task_context)
    installed = {}
    for name, loop in (("asyncio", asyncio.new_event_loop()), ("uvloop", uvloop.new_event_loop())):
        try:
            requests.install_task_factory(loop)
            installed[name] = loop.get_task_factory() is not None
            requests.uninstall_task_factory(loop)
            assert loop.get_task_factory() is None
        finally:
            loop.close()
    assert installed == {"asyncio": False, "uvloop": not task_context}


def lifespan_context() -> contextvars.Context:
    """The context of the app's lifespan, which a connection opened there keeps."""
    from loopwatch.requests import CURRENT_REQUEST, LIFESPAN

    context = contextvars.Context()
    context.run(CURRENT_REQUEST.set, LIFESPAN)
    return context


def test_a_connection_the_lifespan_opened_is_the_apps_background() -> None:
    """A database pool opened in the lifespan: its protocol callbacks run in the lifespan's
    context. The watchdog and the loop-time hook both call them ``<background>`` (the app's),
    not ``<server>``, with the one owner a lifespan hold has."""
    from loopwatch.attribute import BACKGROUND_OWNER, callback_label

    context = lifespan_context()
    owner = in_handle(attribute(own_owner()), context, protocol=True)
    assert owner is BACKGROUND_OWNER
    assert in_handle(attribute(own_owner()), context) is BACKGROUND_OWNER

    class Pool(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    hook = callback_label(Pool().data_received, ServerCode(), lifespan=True)
    assert hook == owner.label == ("-", "<background>")


def test_a_callback_the_loop_time_hook_times_has_its_label_in_every_view() -> None:
    """Where the exact hook times a plain callback, the watchdog takes its answer: the two
    cannot disagree (on uvloop the stack shows only the outermost frame)."""
    from loopwatch.attribute import Attributor

    loop = asyncio.new_event_loop()
    loop.close()
    for timed in (("-", "<server>"), ("-", "<task consume>")):
        attributor = Attributor(loop, own_owner(), lambda: None, frozenset, lambda t=timed: t)
        assert attributor.owner().label == timed
