"""Requests in flight, as the watchdog and the loop-time hooks see them.

With loop time on, the middleware binds a ``RequestRecord`` to a context variable for the
duration of a request: one ``ContextVar.set`` and one ``reset``. Tasks spawned inside the
request (anyio task groups, ``BaseHTTPMiddleware``, ``asyncio.create_task``) and callbacks it
schedules copy the context, so the watchdog can ask, when the loop is held, which request the
running code belongs to, and the loop-time hooks at every step. On Python 3.12+ it reads the
task's context (``Task.get_context()``). On 3.10 and 3.11 a task's context is not readable,
so it reads the loop thread's stack instead (``stack_owner``): the frame that bound the
request, or the running ``Handle``'s context on a pure-Python loop; on a C loop (uvloop), a
task factory records the request of the tasks a request spawns.

With loop time off (stall attribution only), the request is bound to its task in a table
instead (``bind_to_task``): the set made uvicorn run hundreds of young-generation collections
a second under load (BENCHMARKS.md), 5-9 µs a request. The task factory then puts the request
in the context of each task the request spawns (one ``set`` per spawned task, not per
request), so they and theirs are found as before; a plain callback the request's own task
schedules is not (its context holds no request). Fixed owners that are no request (the
lifespan, loopwatch's own work) are records too, so every hook treats them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import sys
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from loopwatch.routes import route_template
from loopwatch.stall import BACKGROUND, OWN, ROUTING, UNMATCHED

__all__ = [
    "CURRENT_REQUEST",
    "HAS_TASK_CONTEXT",
    "LIFESPAN",
    "RequestRecord",
    "bind_by_task",
    "bind_lifespan",
    "bind_request",
    "bind_to_task",
    "binds_in",
    "handle_request",
    "install_task_factory",
    "is_handle_run",
    "is_own",
    "needs_task_factory",
    "own_context",
    "own_owner",
    "owner_of",
    "runs_lifespan",
    "stack_owner",
    "task_bound",
    "unbind_from_task",
    "unbind_request",
    "uninstall_task_factory",
    "watch_tasks",
]

HAS_TASK_CONTEXT = sys.version_info >= (3, 12)

# the request the running code serves (read by the loop-time hooks on every step)
CURRENT_REQUEST: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "loopwatch_request", default=None
)
# Python < 3.12 on a C loop, or a task given a context of its own: task -> the request it
# was created under (the task factory's: nothing unbinds those, so the task is held weakly).
_task_owners: weakref.WeakKeyDictionary[asyncio.Task[Any], RequestRecord] = (
    weakref.WeakKeyDictionary()
)
# loop time off: a request's own task -> its record, from bind_to_task to unbind_from_task
_task_records: dict[asyncio.Task[Any], RequestRecord] = {}
# the loops whose requests are bound to their task (bind_by_task)
_task_bound_loops: set[asyncio.AbstractEventLoop] = set()
# Python < 3.12: the code of the frames that bind a request -> the local holding its record
_binding_frames: dict[CodeType, str] = {}
# a pure-Python loop runs every callback in ``Handle._run`` (told by name and file, so that
# a tool that wrapped the method before loopwatch was imported does not hide it)
_EVENTS_PY = os.path.join("asyncio", "events.py")


class RequestRecord:
    """One request (or websocket) in flight, as the watchdog needs to see it."""

    __slots__ = (
        "__weakref__",
        "booked",
        "busy",
        "done",
        "method",
        "root_path",
        "route",
        "scope",
        "trace",
        "unrouted",
    )  # fmt: skip

    def __init__(
        self, method: str, scope: Any, root_path: str, *, routed: bool = True,
        trace: object = None,
    ) -> None:  # fmt: skip
        self.method = method
        self.scope = scope
        self.root_path = root_path
        self.route: str | None = None  # set once, by finish()
        self.done = False  # the app returned; the route can be read from the scope any time
        # what owns this request's code while no route is known: ``<routing>`` in an app
        # with a router (code before it, a middleware), ``<unmatched>`` in one without (it
        # is never routed): one owner for a hold from its first booking to every view
        self.unrouted = ROUTING if routed else UNMATCHED
        # loop time: seconds the loop ran this request's code (written on the loop thread
        # by the accounting hook), and how much of it is booked (by the watchdog)
        self.busy = 0.0
        self.booked = 0.0
        # OpenTelemetry on: the request's OTel context as it entered the middleware (its
        # server span), read by the watchdog to tell it when another request stalls the loop
        self.trace = trace

    def current_route(self) -> str | None:
        """The final route if finished, else what the scope says so far (None: not routed)."""
        route = self.route
        if route is not None:
            return route
        scope = self.scope
        if scope is None:  # settled meanwhile (on the loop thread): it set the route first
            return self.route
        try:
            return route_template(scope, self.root_path)
        except Exception:  # a framework's object misbehaving must not break the watchdog
            return None

    def owner_route(self) -> str:
        """The route a hold in this request's code is booked under now."""
        route = self.current_route()
        return route if route is not None else self.unrouted

    def end(self) -> None:
        """The app returned (its route is read from the scope when needed)."""
        self.done = True

    def finish(self) -> str:
        self.done = True
        route = self.current_route()
        self.route = route if route is not None else UNMATCHED
        return self.route

    def settle(self) -> None:
        """Over, with its route read: the scope is let go. A finished record waits for the
        next booking of loop time (a quarter of a second), and the scope it held would make
        every request's objects outlive it: three times the garbage collections, ~8 µs a
        request (benchmarks.inprocess)."""
        if self.route is None:
            self.finish()
        self.scope = None


def _fixed_owner(route: str) -> RequestRecord:
    """An owner that is no request: its route is fixed, and as it is ``done`` the loop time
    charged to it is booked at the next drain (``accounting``), like a finished request's."""
    record = RequestRecord("-", None, "")
    record.route = route
    record.done = True
    return record


# The owner of the app's code that runs outside any request, bound where loopwatch knows it
# runs it (the lifespan), so the server's task that calls it is not taken for the server's own
# work. Code bound to it is attributed as code no request owns (``attribute``): the task that
# runs the lifespan (the server's, TestClient's) is ``<background>``, a task the app starts
# from it is named by its coroutine.
LIFESPAN = _fixed_owner(BACKGROUND)
_lifespan_tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def bind_lifespan() -> Binding:
    """Bind ``LIFESPAN`` in the task that runs the app's lifespan (and so in the tasks the app
    starts from it, which copy its context)."""
    task = asyncio.current_task()
    if task is not None:
        with contextlib.suppress(TypeError):  # a factory's task that takes no weak reference
            _lifespan_tasks.add(task)
    return CURRENT_REQUEST.set(LIFESPAN)


def runs_lifespan(task: Any) -> bool:
    """``task`` runs the app's lifespan itself (not a task the app started from it)."""
    try:
        return task in _lifespan_tasks
    except TypeError:  # not weak-referenceable: no task of ours
        return False


def own_owner() -> RequestRecord:
    """The owner of loopwatch's own code on one loop (the heartbeat, its start-up work, the
    callbacks the watchdog schedules): every hook sees it like a request, and as it is not
    ``done`` nor in flight, what is charged to it (``busy``) is never booked to the app."""
    record = RequestRecord("-", None, "")
    record.route = OWN
    return record


def is_own(owner: object) -> bool:
    return isinstance(owner, RequestRecord) and owner.route == OWN


def own_context(owner: RequestRecord) -> contextvars.Context:
    """A context in which code is loopwatch's own (pass to ``create_task``/``call_soon``)."""
    context = contextvars.Context()
    context.run(CURRENT_REQUEST.set, owner)
    return context


Binding = contextvars.Token["RequestRecord | None"]


def bind_request(record: RequestRecord) -> Binding:
    """Make ``record`` the current request of this task and of the tasks it spawns."""
    return CURRENT_REQUEST.set(record)


def unbind_request(binding: Binding) -> None:
    try:  # noqa: SIM105 - not contextlib.suppress: this runs once per request
        CURRENT_REQUEST.reset(binding)
    except ValueError:  # a reset from another context (a server that moved the request)
        pass


TaskBinding = tuple["asyncio.Task[Any] | None", "RequestRecord | None", "Binding | None"]


def bind_to_task(record: RequestRecord) -> TaskBinding:
    """Make ``record`` the request of the running task without touching its context (loop
    time off); a server that runs the app outside any task gets the context variable."""
    task = asyncio.current_task()
    if task is None:
        return None, None, CURRENT_REQUEST.set(record)
    previous = _task_records.get(task)
    _task_records[task] = record
    return task, previous, None


def unbind_from_task(binding: TaskBinding) -> None:
    task, previous, token = binding
    if token is not None:
        unbind_request(token)
    elif previous is not None:
        _task_records[task] = previous  # type: ignore[index]
    else:
        _task_records.pop(task, None)  # type: ignore[arg-type]


def bind_by_task(loop: asyncio.AbstractEventLoop, on: bool) -> None:
    """Whether the requests served on ``loop`` are bound to their task (loop time off): its
    task factory then names the request of each task a request spawns."""
    if on:
        _task_bound_loops.add(loop)
    else:
        _task_bound_loops.discard(loop)
        # a request whose task never finished (the loop closed under it) would hold its task
        for task in [t for t in tuple(_task_records) if t.get_loop() is loop]:
            _task_records.pop(task, None)


def task_bound(task: asyncio.Task[Any]) -> RequestRecord | None:
    """The request ``task`` was bound to without its context (``bind_to_task``, or the task
    factory's record of a task given a context of its own). No lock: the loop thread's
    signal handler may call it."""
    record = _task_records.get(task)
    if record is None and _task_owners:
        try:
            record = _task_owners.get(task)
        except TypeError:  # not weak-referenceable: an app's own object
            return None
    return record


def binds_in(function: Callable[..., Any], local: str) -> None:
    """``function`` binds a request held in its local variable ``local``: on Python < 3.12
    the watchdog finds the request of the loop's running task by that frame on its stack."""
    _binding_frames[function.__code__] = local


def current_request() -> RequestRecord | None:
    return CURRENT_REQUEST.get()


def owner_of(
    task: asyncio.Task[Any] | None, frame: Callable[[], FrameType | None] | None = None
) -> RequestRecord | None:
    """The request a task runs for, read from any thread; None for background code. On
    Python < 3.12, ``task`` must be the loop's running task and ``frame`` return the loop
    thread's current frame: its stack names the request (``stack_owner``)."""
    if task is None:
        return None
    if HAS_TASK_CONTEXT:
        try:
            record: RequestRecord | None = task.get_context().get(CURRENT_REQUEST)  # type: ignore[attr-defined]
        except Exception:
            return None
        return record if record is not None else task_bound(task)
    if frame is not None:
        owner = stack_owner(frame())
        if owner is not None:
            return owner
    return task_bound(task)


def stack_owner(frame: FrameType | None) -> RequestRecord | None:
    """Python < 3.12, from any thread: the request whose code the loop thread runs, read from
    its stack, innermost first: the frame that bound it (the middleware's, for the request's
    own task), or the context of the running ``Handle`` on a pure-Python loop (a task's step
    runs in the task's context, a callback in the one it was scheduled in). The innermost
    ``Handle`` is the running step: the walk ends there, so a loop run inside a request's
    code (nest_asyncio) does not lend that request to its own steps. None if nothing names
    one: a C loop's spawned task (the task factory's), or no request's code."""
    try:  # read across threads: a torn read names nobody
        while frame is not None:
            code = frame.f_code
            local = _binding_frames.get(code)
            if local is not None:
                owner = frame.f_locals.get(local)
                if isinstance(owner, RequestRecord):
                    return owner
            elif is_handle_run(code):
                return handle_request(frame.f_locals.get("self"))
            frame = frame.f_back
    except Exception:
        return None
    return None


def is_handle_run(code: CodeType) -> bool:
    """``Handle._run``'s code: where a pure-Python loop runs every callback."""
    return code.co_name == "_run" and code.co_filename.endswith(_EVENTS_PY)


def handle_request(handle: object) -> RequestRecord | None:
    """The request bound in the context a ``Handle`` runs its callback in (None: none)."""
    context = getattr(handle, "_context", None)
    return context.get(CURRENT_REQUEST) if context is not None else None


# loop -> called with each task created on it (loop-time accounting on uvloop, 3.12+)
_task_watchers: dict[asyncio.AbstractEventLoop, Callable[[Any], None]] = {}


def watch_tasks(loop: asyncio.AbstractEventLoop, watcher: Callable[[Any], None] | None) -> None:
    """Have ``watcher`` see every task created on ``loop`` (None: stop)."""
    if watcher is None:
        _task_watchers.pop(loop, None)
        if HAS_TASK_CONTEXT:
            uninstall_task_factory(loop)
    else:
        _task_watchers[loop] = watcher
        install_task_factory(loop)


def install_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """A task factory that chains to the loop's own: it names the request of each task a
    request spawns where the context cannot (``_spawned_request``); it also feeds
    ``watch_tasks``.

    Called again on every request: an app that sets its own factory at start-up, without
    chaining to the one it replaces, gets it wrapped (and still called) from then on."""
    if not needs_task_factory(loop):
        return
    previous = loop.get_task_factory()
    if getattr(previous, "_loopwatch", False):
        return
    names = _names_spawned_tasks(loop)  # fixed while the factory is in place
    current_task, current_request = asyncio.current_task, CURRENT_REQUEST.get

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        record = context = None
        # a task made outside any task and request (the server's per request) is nobody's:
        # one test and no more, as it runs for every request
        if names and (kwargs or current_task(loop) is not None or current_request() is not None):
            record, context = _spawned_request(loop, kwargs)
        if context is not None:  # created inside it: the task copies it, as the creator's
            task = context.run(_make, previous, loop, coro, kwargs)
        elif previous is not None:  # _make's two cases inline: this runs for every task
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if record is not None:
            try:  # noqa: SIM105 - not contextlib.suppress: this runs once per task
                _task_owners[task] = record
            except TypeError:  # an app's factory returned something unweakable
                pass
        watcher = _task_watchers.get(loop)
        if watcher is not None:
            watcher(task)
        return task

    factory._loopwatch = True  # type: ignore[attr-defined]
    factory._previous = previous  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


def _make(
    previous: Callable[..., Any] | None,
    loop: asyncio.AbstractEventLoop,
    coro: Any,
    kwargs: dict[str, Any],
) -> Any:
    """A task as the loop would make it: by the factory ours chained to, else a plain one."""
    if previous is not None:
        return previous(loop, coro, **kwargs)
    return asyncio.Task(coro, loop=loop, **kwargs)


def _spawned_request(
    loop: asyncio.AbstractEventLoop, kwargs: dict[str, Any]
) -> tuple[RequestRecord | None, contextvars.Context | None]:
    """For a task about to be created on ``loop``: the request the factory must record for it
    (None: nobody's, or its context names it where it can be read), and a context to create
    it in (None: as it would be). A request bound to its task (``bind_to_task``) is put in a
    copy of the creator's context, so the new task, what it spawns and schedules, and an
    eager task's first step (run inside this call) all name it."""
    given = kwargs.get("context")
    record = given.get(CURRENT_REQUEST) if given is not None else CURRENT_REQUEST.get()
    in_context = record is not None
    context = None
    if record is None and loop in _task_bound_loops:
        parent = asyncio.current_task(loop)
        record = task_bound(parent) if parent is not None else None
        if record is not None and given is None:
            context = contextvars.copy_context()
            context.run(CURRENT_REQUEST.set, record)
            in_context = True
    if in_context and (HAS_TASK_CONTEXT or isinstance(loop, asyncio.BaseEventLoop)):
        return None, context  # its context is read (Task.get_context, or the Handle's)
    return record, context


def needs_task_factory(loop: asyncio.AbstractEventLoop) -> bool:
    """A factory for ``watch_tasks``, or to name the request of the tasks a request spawns
    (``_names_spawned_tasks``)."""
    return loop in _task_watchers or _names_spawned_tasks(loop)


def _names_spawned_tasks(loop: asyncio.AbstractEventLoop) -> bool:
    """The factory names the request of each task created in one: on a loop whose requests
    are bound to their task, and on a C loop before 3.12 (its tasks' context is unreadable)."""
    return loop in _task_bound_loops or not (
        HAS_TASK_CONTEXT or isinstance(loop, asyncio.BaseEventLoop)
    )


def uninstall_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """Put back the factory ours chained to, if ours is still the loop's."""
    current = loop.get_task_factory()
    if getattr(current, "_loopwatch", False) and not loop.is_closed():
        loop.set_task_factory(current._previous)  # type: ignore[union-attr]
