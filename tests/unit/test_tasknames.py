"""Names of the app's tasks that no request started: ``<task consume>``, bounded by code."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

import pytest

from loopwatch.attribute import Attributor, Owner
from loopwatch.requests import LIFESPAN, RequestRecord, bind_request, own_owner, unbind_request
from loopwatch.tasknames import TaskNames


async def consume() -> None:
    await asyncio.sleep(0)


class Consumer:
    async def run(self) -> None:
        await asyncio.sleep(0)


def outer() -> Coroutine[Any, Any, None]:
    async def inner() -> None:
        await asyncio.sleep(0)

    return inner()


def _close(coro: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
    coro.close()  # never awaited: only its code and names are read
    return coro


def test_a_task_is_named_by_its_coroutines_qualified_name() -> None:
    names = TaskNames()
    assert names.of_coroutine(_close(consume())) == ("-", "<task consume>")
    assert names.of_coroutine(_close(Consumer().run())) == ("-", "<task Consumer.run>")
    assert names.of_coroutine(_close(outer())) == ("-", "<task outer.inner>")
    # by the code object: the sys.monitoring hook sees no coroutine
    assert names.of_code(consume.__code__) == ("-", "<task consume>")
    assert names.of_coroutine(iter([])) is None  # no coroutine: not a task's name


def test_names_are_bounded_by_a_cap_then_other_tasks() -> None:
    names = TaskNames(cap=3)
    codes = [
        compile(f"async def job_{i}():\n    pass\n", "<generated>", "exec").co_consts[0]
        for i in range(6)
    ]
    labels = [names.of_code(code) for code in codes]
    assert labels[:3] == [("-", f"<task job_{i}>") for i in range(3)]
    assert labels[3:] == [("-", "<other tasks>")] * 3
    # a name already given stays given
    assert names.of_code(codes[1]) == ("-", "<task job_1>")


def test_a_name_is_escaped_and_cut_to_size() -> None:
    names = TaskNames()
    code = consume.__code__.replace(co_name="x")  # a code of its own
    (_, label) = names.of_code(code, "evil\n\x1b[31m" + "y" * 500)
    assert label.startswith("<task evil\\n\\x1b[31m") and label.endswith(">")
    assert "\n" not in label and "\x1b" not in label and len(label) <= 110


@pytest.mark.parametrize("bound", [None, "lifespan", "request"])
def test_the_owner_of_a_task_no_request_started_is_its_name(bound: str | None) -> None:
    """The app's task outside requests is named, started from the lifespan too (a worker the
    app starts at start-up); a task started inside a request stays the request's."""
    seen: list[Owner] = []
    record = RequestRecord("GET", {}, "")
    record.route = "/items"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # read on the loop's own thread here: its stack is this one (Python < 3.12 reads it)
        attributor = Attributor(loop, own_owner(), sys._getframe, frozenset)
        binding = None
        if bound is not None:
            binding = bind_request(LIFESPAN if bound == "lifespan" else record)
        try:

            async def worker() -> None:
                task = asyncio.current_task()
                assert task is not None
                seen.append(attributor.task_owner(task))

            await asyncio.create_task(worker())  # in a copy of this context, as any task
        finally:
            if binding is not None:
                unbind_request(binding)

    asyncio.run(main())
    [owner] = seen
    if bound == "request":
        assert owner.label == ("GET", "/items") and owner.record is record
    else:
        name = "<task test_the_owner_of_a_task_no_request_started_is_its_name.main.worker>"
        assert owner.label == ("-", name) and owner.background and owner.booked


def test_a_task_anyio_wraps_is_named_by_the_coroutine_it_runs() -> None:
    """anyio 4.10+ runs each task group task inside its own ``TaskHandle._run_coro``: the
    task is named by the function the app gave it, as on any other task, not by anyio's
    wrapper (which would put every anyio task in one bucket)."""
    import anyio

    seen: list[tuple[str, str] | None] = []

    async def worker() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append(TaskNames().of_coroutine(task.get_coro()))

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(worker)

    anyio.run(main, backend="asyncio")
    assert seen == [
        ("-", "<task test_a_task_anyio_wraps_is_named_by_the_coroutine_it_runs.worker>")
    ]


def test_the_loops_own_tasks_are_the_servers_and_wait_for_names_what_it_runs() -> None:
    """asyncio's own coroutines that run as tasks (accepting a connection, resolving a
    server's address) are transport work, ``<server>``; ``asyncio.wait_for`` is no name of a
    task: the task is named by the coroutine it runs (in the same task on 3.12+)."""
    from loopwatch.attribute import ServerCode, task_label

    names = TaskNames()
    getaddrinfo = asyncio.base_events.BaseEventLoop._create_server_getaddrinfo
    assert names.of_code(getaddrinfo.__code__, getaddrinfo.__qualname__) == ("-", "<server>")
    seen: list[tuple[str, str]] = []

    async def worker() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append(task_label(task, ServerCode()))

    async def main() -> None:
        await asyncio.create_task(asyncio.wait_for(worker(), 5))

    asyncio.run(main())
    name = "<task test_the_loops_own_tasks_are_the_servers_and_wait_for_names_what_it_runs.worker>"
    assert seen == [("-", name)]


def test_a_decorated_coroutine_is_named_after_the_function_it_wraps() -> None:
    """A decorator's wrapper code is shared by every function it wraps (tenacity, backoff):
    each task is named by its own function, as ``functools.wraps`` names its coroutine."""
    import functools

    def retry(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper() -> None:
            await fn()

        return wrapper

    @retry
    async def poll_orders() -> None:
        pass

    @retry
    async def poll_refunds() -> None:
        pass

    names = TaskNames()
    first, second = _close(poll_orders()), _close(poll_refunds())
    assert first.cr_code is second.cr_code  # one wrapper code for both
    prefix = "<task test_a_decorated_coroutine_is_named_after_the_function_it_wraps"
    assert names.of_coroutine(first) == ("-", f"{prefix}.poll_orders>")
    assert names.of_coroutine(second) == ("-", f"{prefix}.poll_refunds>")


def test_equal_code_in_two_places_gets_two_names() -> None:
    """Code objects compare by value: two classes' methods with the same body can be equal.
    Each keeps its own name."""
    one = consume.__code__.replace(co_name="run")
    two = consume.__code__.replace(co_name="run")
    names = TaskNames()
    assert names.of_code(one, "Orders.run") == ("-", "<task Orders.run>")
    assert names.of_code(two, "Refunds.run") == ("-", "<task Refunds.run>")


def test_the_portals_task_is_named_by_its_function_before_it_runs() -> None:
    """The loop-time hook names a step as it starts: the portal's wrapper has not called the
    function yet, so its coroutine is not there; the function it will call is."""
    from anyio.from_thread import BlockingPortal

    async def heavy() -> None:
        pass

    async def main() -> None:
        async with BlockingPortal() as portal:
            future: Any = None
            wrapper = portal._call_func(heavy, (), {}, future)  # as the portal makes it
            try:
                assert TaskNames().of_coroutine(wrapper) == (
                    "-", "<task test_the_portals_task_is_named_by_its_function_before_it_runs.heavy>",
                )  # fmt: skip
            finally:
                wrapper.close()

    asyncio.run(main())


def test_a_step_is_named_by_its_task_not_by_the_code_that_starts_it() -> None:
    """On 3.12+ the sys.monitoring hook sees the code a step starts at; where that is not the
    task's top coroutine (a task the factory never saw), it names the task as the watchdog
    does."""
    from loopwatch.attribute import ServerCode, code_label

    seen: list[tuple[str, str]] = []

    async def inner() -> None:
        seen.append(code_label(inner.__code__, ServerCode(), loop=asyncio.get_running_loop()))

    async def outer_task() -> None:
        await inner()

    asyncio.run(outer_task())
    name = "<task test_a_step_is_named_by_its_task_not_by_the_code_that_starts_it.outer_task>"
    assert seen == [("-", name)]
