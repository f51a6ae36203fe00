"""What the loop thread runs now: task -> request -> route, and the culprit frame.

The middleware binds a ``RequestRecord`` to a context variable for the duration of a request.
Tasks spawned inside the request (anyio task groups, ``BaseHTTPMiddleware``,
``asyncio.create_task``) copy the context, so the watchdog can ask any task which request it
belongs to. On Python 3.12+ it reads the task's context directly (``Task.get_context()``); on
3.10 and 3.11 a task's context is not readable, so a task factory records the owner when the
task is created.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
import sysconfig
import traceback
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, NamedTuple

from loopwatch.routes import route_template
from loopwatch.stall import BACKGROUND, OWN, ROUTING, SERVER, UNMATCHED

__all__ = [
    "CodeFilter",
    "RequestRecord",
    "bind_request",
    "install_task_factory",
    "owner_of",
    "unbind_request",
    "uninstall_task_factory",
    "watch_tasks",
]

HAS_TASK_CONTEXT = sys.version_info >= (3, 12)

_current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "loopwatch_request", default=None
)
# Python < 3.12 only: task -> the request it was created under.
_task_owners: weakref.WeakKeyDictionary[asyncio.Task[Any], RequestRecord] = (
    weakref.WeakKeyDictionary()
)


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
        if self.route is not None:
            return self.route
        try:
            return route_template(self.scope, self.root_path)
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


def _fixed_owner(route: str) -> RequestRecord:
    """An owner that is no request: its route is fixed, and as it is ``done`` the loop time
    charged to it is booked at the next drain (``accounting``), like a finished request's."""
    record = RequestRecord("-", None, "")
    record.route = route
    record.done = True
    return record


def background_owner() -> RequestRecord:
    """The owner of the app's code that runs outside any request, bound where loopwatch knows
    it runs it (the lifespan), so the server's task that calls it is not taken for the
    server's own work."""
    return _fixed_owner(BACKGROUND)


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
    context.run(_current_request.set, owner)
    return context


Binding = tuple[contextvars.Token["RequestRecord | None"], "asyncio.Task[Any] | None", Any]


def bind_request(record: RequestRecord) -> Binding:
    """Make ``record`` the current request of this task and of the tasks it spawns."""
    task = previous = None
    if not HAS_TASK_CONTEXT:
        task = asyncio.current_task()
        if task is not None:
            previous = _task_owners.get(task)
            _task_owners[task] = record
    return _current_request.set(record), task, previous


def unbind_request(binding: Binding) -> None:
    token, task, previous = binding
    try:  # noqa: SIM105 - not contextlib.suppress: this runs once per request
        _current_request.reset(token)
    except ValueError:  # a reset from another context (a server that moved the request)
        pass
    if task is not None:  # Python < 3.12: the task no longer runs for this request
        if previous is None:
            _task_owners.pop(task, None)
        else:
            _task_owners[task] = previous


def current_request() -> RequestRecord | None:
    return _current_request.get()


def owner_of(task: asyncio.Task[Any] | None) -> RequestRecord | None:
    """The request a task runs for, read from any thread; None for background code."""
    if task is None:
        return None
    if HAS_TASK_CONTEXT:
        try:
            return task.get_context().get(_current_request)  # type: ignore[attr-defined,no-any-return]
        except Exception:
            return None
    return _task_owners.get(task)


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
    """A task factory that chains to the loop's own: on Python < 3.12 it remembers each new
    task's request (its context is not readable later); it also feeds ``watch_tasks``.

    Called again on every request: an app that sets its own factory at start-up, without
    chaining to the one it replaces, gets it wrapped (and still called) from then on."""
    if HAS_TASK_CONTEXT and loop not in _task_watchers:
        return
    previous = loop.get_task_factory()
    if getattr(previous, "_loopwatch", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if previous is not None:
            task = previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        if not HAS_TASK_CONTEXT:
            context = kwargs.get("context")
            record = (
                context.get(_current_request) if context is not None else _current_request.get()
            )
            if record is not None:
                try:  # noqa: SIM105 - not contextlib.suppress: this runs once per task
                    _task_owners[task] = record  # type: ignore[index]
                except TypeError:  # an app's factory returned something unweakable
                    pass
        watcher = _task_watchers.get(loop)
        if watcher is not None:
            watcher(task)
        return task

    factory._loopwatch = True  # type: ignore[attr-defined]
    factory._previous = previous  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


def uninstall_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """Put back the factory ours chained to, if ours is still the loop's."""
    current = loop.get_task_factory()
    if getattr(current, "_loopwatch", False) and not loop.is_closed():
        loop.set_task_factory(current._previous)  # type: ignore[union-attr]


# The servers whose own tasks and callbacks are ``<server>`` work (the app's code they call
# runs bound to a request, or to the lifespan's owner, by the middleware).
SERVER_PACKAGES = ("uvicorn", "uvicorn_worker", "hypercorn", "granian", "gunicorn", "daphne")
# a callback that is a method of one of these is the server's (or the loop's) protocol work
SERVER_TYPES: tuple[type, ...] = (
    asyncio.BaseTransport,
    asyncio.BaseProtocol,
    asyncio.AbstractEventLoop,
)


class ServerCode:
    """Tells the server's own code from the app's by the file of a code object: inside a
    server package loaded in this process. Results are cached per code object."""

    def __init__(self) -> None:
        self._dirs: tuple[str, ...] | None = None
        self._known: dict[int, bool] = {}

    def dirs(self) -> tuple[str, ...]:
        if self._dirs is None:
            found = []
            for name in SERVER_PACKAGES:
                module = sys.modules.get(name)
                path = getattr(module, "__file__", None)
                if isinstance(path, str):
                    found.append(os.path.join(os.path.dirname(path), ""))
            self._dirs = tuple(found)
        return self._dirs

    def is_server(self, code: CodeType) -> bool:
        known = self._known.get(id(code))
        if known is None:
            known = code.co_filename.startswith(self.dirs()) if self.dirs() else False
            if len(self._known) < 10_000:
                self._known[id(code)] = known  # code objects of a module live as long as it
        return known

    def task_is_server(self, task: Any) -> bool:
        """An ownerless task that runs the server's code (its main loop, a connection)."""
        try:
            code = getattr(task.get_coro(), "cr_code", None)
        except Exception:
            return False
        return code is not None and self.is_server(code)


def callback_is_server(callback: Any, server_code: ServerCode) -> bool:
    """A plain callback (not a task step) that is protocol work, or a server task's step."""
    target = getattr(callback, "__self__", None)
    if isinstance(target, SERVER_TYPES):
        return True
    return isinstance(target, asyncio.Task) and server_code.task_is_server(target)


def running_callback_owner(
    frame: FrameType | None, server_code: ServerCode, entry_codes: frozenset[CodeType]
) -> RequestRecord | str | None:
    """Read from the watchdog while the loop thread runs no task: the owner of the plain
    callback it runs (one scheduled with ``call_soon``/``call_later``, or protocol work).

    On a pure-Python loop the callback runs inside ``Handle._run``, whose handle carries the
    context it was scheduled in (a request's, for a callback a request scheduled) and the
    callback itself. A C loop (uvloop) shows no handle: only the outermost Python frame
    inside the loop's run call (``entry_codes``: the frame that called into it), which tells
    the server's protocol code from anything else. A request record, ``SERVER`` or None
    (background)."""
    outermost = None
    while frame is not None and frame.f_code not in entry_codes:
        code = frame.f_code
        if code.co_name == "_run" and code.co_filename.endswith(_EVENTS_PY):
            try:
                handle = frame.f_locals.get("self")
                context = getattr(handle, "_context", None)
                owner = context.get(_current_request) if context is not None else None
                if owner is not None:
                    return owner  # type: ignore[no-any-return]
                callback = getattr(handle, "_callback", None)
            except Exception:  # read across threads: a torn read is background
                return None
            return SERVER if callback_is_server(callback, server_code) else None
        outermost = frame
        frame = frame.f_back
    if outermost is not None:
        if server_code.is_server(outermost.f_code):
            return SERVER
        try:
            target = outermost.f_locals.get("self")
        except Exception:
            return None
        if isinstance(target, SERVER_TYPES):
            return SERVER
    return None


_EVENTS_PY = os.path.join("asyncio", "events.py")


class Owner(NamedTuple):
    """Who holds the loop: the one answer every view gives for a hold."""

    key: object  # identity: the request's record, or one fixed object per placeholder
    record: RequestRecord | None
    label: tuple[str, str]  # (method, route) in every view
    booked: bool = True  # False: loopwatch's own work, never booked to the app
    background: bool = False  # code outside any request (an idle process looks like it)
    task: Any = None  # the loop's current task, if it runs one


_BACKGROUND = Owner(object(), None, ("-", BACKGROUND), background=True)
_SERVER = Owner(object(), None, ("-", SERVER))
_OWN = Owner(object(), None, ("-", OWN), booked=False)


class Attributor:
    """Decides who holds one loop now, read from the watchdog's thread (the loop is held).

    The one rule every view follows, and that loop time charges callbacks by too: a task step
    belongs to the request bound in the task's context; a plain callback to the request whose
    context it was scheduled in (``call_later`` from a request); the server's own code (its
    tasks, its protocol callbacks) to ``<server>``; loopwatch's own to none of the app's
    books; anything else to ``<background>``. A request's code before it is routed (a
    middleware inside loopwatch) is ``<routing>``, or ``<unmatched>`` in an app with no
    router: the route it gets later is not known while the loop is held."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        own: RequestRecord,
        frame: Callable[[], FrameType | None],
        entry_codes: Callable[[], frozenset[CodeType]],
    ) -> None:
        self._loop = loop
        self._own = own
        self._frame = frame
        self._entry_codes = entry_codes
        self.server_code = ServerCode()

    def owner(self) -> Owner:
        task = asyncio.current_task(self._loop)
        if task is not None:
            record = owner_of(task)
            if record is None:
                return _SERVER if self.server_code.task_is_server(task) else _BACKGROUND
        else:
            found = running_callback_owner(self._frame(), self.server_code, self._entry_codes())
            if found is None:
                return _BACKGROUND
            if isinstance(found, str):
                return _SERVER
            record = found
        if record is self._own or is_own(record):
            return _OWN
        return Owner(record, record, (record.method, record.owner_route()), task=task)


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.add(os.path.dirname(os.path.abspath(__file__)))  # loopwatch itself
    dirs.update(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


class CodeFilter:
    """Decides which frames are application code: not the standard library, not
    site-packages, not loopwatch. Results are cached per file name."""

    def __init__(self, library_dirs: tuple[str, ...] | None = None) -> None:
        # Resolved at first use, on the watchdog thread: the paths are realpath()ed, file
        # system calls a monitor built on the loop must not make there (blockbuster).
        self._dirs = library_dirs
        self._cache: dict[str, bool] = {}

    def is_app(self, filename: str) -> bool:
        known = self._cache.get(filename)
        if known is None:
            if filename.startswith("<"):  # <frozen ...>, <string>
                known = False
            else:
                if self._dirs is None:
                    self._dirs = _library_dirs()
                real = os.path.realpath(filename)
                known = not real.startswith(self._dirs)
            if len(self._cache) < 10_000:
                self._cache[filename] = known
        return known

    def culprit(self, frame: FrameType | None) -> tuple[str, int, str] | None:
        """(path, line, function) of the innermost application frame, else the innermost frame."""
        innermost = None
        while frame is not None:
            code = frame.f_code
            if innermost is None:
                innermost = (code.co_filename, frame.f_lineno, code.co_name)
            if self.is_app(code.co_filename):
                return (code.co_filename, frame.f_lineno, code.co_name)
            frame = frame.f_back
        return innermost


def format_culprit(where: tuple[str, int, str] | None) -> str:
    if where is None:
        return "<unknown>"
    path, line, function = where
    return f"{path}:{line} in {function}"


def format_stack(frame: FrameType | None, limit: int = 60) -> str:
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame, limit=limit))


FrameSource = Callable[[], dict[int, FrameType]]
