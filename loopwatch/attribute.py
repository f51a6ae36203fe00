"""Attribute: who owns what the loop thread runs now, one rule for every view.

A task step belongs to the request bound in the task's context; a plain callback to the
request whose context it was scheduled in (read from its ``Handle`` on a pure-Python loop, and
on uvloop from the loop-time hook that times it, 3.12+); the
server's own code (its tasks, its protocol callbacks) to ``<server>``; loopwatch's own work to
none of the app's books; a step of a task no request started to that task's coroutine
(``<task consume>``, ``tasknames``); anything else (a plain callback, the app's lifespan code)
to ``<background>``. The loop-time hooks (``accounting``) charge callbacks by the same rule.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, NamedTuple

from loopwatch.requests import (
    CURRENT_REQUEST,
    HAS_TASK_CONTEXT,
    LIFESPAN,
    RequestRecord,
    handle_request,
    is_handle_run,
    is_own,
    owner_of,
    runs_lifespan,
    task_bound,
)
from loopwatch.stall import BACKGROUND_LABEL, OWN, SERVER, SERVER_LABEL
from loopwatch.tasknames import is_coroutine_code, task_names

__all__ = [
    "BACKGROUND_LABEL",
    "BACKGROUND_OWNER",
    "SERVER_LABEL",
    "Attributor",
    "Owner",
    "ServerCode",
    "callback_is_server",
    "callback_label",
    "code_label",
    "running_callback_owner",
    "task_label",
]

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


# The rule for code no request owns, from what each reader sees: the task (the watchdog, the
# sampling hook), the callback (the Handle hook) or the step's code (the sys.monitoring hook).
# ``lifespan``: it runs bound to the app's lifespan (``LIFESPAN``): the task that runs the
# lifespan (the server's, TestClient's) is then the app's ``<background>``, not ``<server>``;
# a task the app started from it is named like any other.


def task_label(task: Any, server_code: ServerCode, lifespan: bool = False) -> tuple[str, str]:
    """A step of ``task`` that no request owns: the server's own task, or the app's task
    named by its coroutine (``<task consume>``); ``<background>`` if it has none."""
    if lifespan and runs_lifespan(task):
        return BACKGROUND_LABEL
    try:
        coro = task.get_coro()
    except Exception:
        return BACKGROUND_LABEL
    code = getattr(coro, "cr_code", None)
    if code is not None and server_code.is_server(code):
        return BACKGROUND_LABEL if lifespan else SERVER_LABEL
    return task_names.of_task(task, coro) or BACKGROUND_LABEL


def code_label(
    code: CodeType,
    server_code: ServerCode,
    lifespan: bool = False,
    loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[str, str]:
    """``task_label`` from the code of a step's top frame, on ``loop``'s thread: a task's
    step is named by the current task, as the watchdog names it (its top coroutine may not
    be this code: a task the factory never saw); a plain callback's function is
    ``<background>``."""
    if server_code.is_server(code):
        return BACKGROUND_LABEL if lifespan else SERVER_LABEL
    if not is_coroutine_code(code):
        return BACKGROUND_LABEL
    if loop is not None:
        task = asyncio.current_task(loop)
        if task is not None:
            return task_label(task, server_code, lifespan)
    label = None if lifespan else task_names.of_code(code)
    return label or BACKGROUND_LABEL


def callback_label(
    callback: Any, server_code: ServerCode, lifespan: bool = False
) -> tuple[str, str]:
    """``task_label`` from a loop callback: a task's step (its bound method), protocol work
    (``<server>``) or a plain callback (``<background>``)."""
    target = getattr(callback, "__self__", None)
    if isinstance(target, asyncio.Task):
        return task_label(target, server_code, lifespan)
    if isinstance(target, SERVER_TYPES):
        # a connection the app opened in its lifespan (a database pool) is the app's
        return BACKGROUND_LABEL if lifespan else SERVER_LABEL
    return BACKGROUND_LABEL


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
        if is_handle_run(code):
            try:
                handle = frame.f_locals.get("self")
                owner = handle_request(handle)
                if owner is not None:
                    return owner
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


class Owner(NamedTuple):
    """Who holds the loop: the one answer every view gives for a hold."""

    key: object  # identity: the request's record, or one fixed object per placeholder
    record: RequestRecord | None
    label: tuple[str, str]  # (method, route) in every view
    booked: bool = True  # False: loopwatch's own work, never booked to the app
    background: bool = False  # code outside any request (an idle process looks like it)
    task: Any = None  # the loop's current task, if it runs one


# code outside any request; also the owner of a collection that ran inside loopwatch's own
# code (the collector works on the app's heap: loopwatch's allocation only came last)
BACKGROUND_OWNER = Owner(object(), None, BACKGROUND_LABEL, background=True)
_SERVER = Owner(object(), None, SERVER_LABEL)
_OWN = Owner(object(), None, ("-", OWN), booked=False)
# one owner per task label (bounded by ``tasknames``' cap): a hold keeps its owner's identity
_TASK_OWNERS: dict[tuple[str, str], Owner] = {}


def _label_owner(label: tuple[str, str]) -> Owner:
    if label == SERVER_LABEL:
        return _SERVER
    if label == BACKGROUND_LABEL:
        return BACKGROUND_OWNER
    owner = _TASK_OWNERS.get(label)
    if owner is None:
        owner = _TASK_OWNERS.setdefault(label, Owner(object(), None, label, background=True))
    return owner


class Attributor:
    """Decides who holds one loop now, read from the watchdog's thread (the loop is held).

    The one rule every view follows, and that loop time charges callbacks by too: a task step
    belongs to the request bound in the task's context; a plain callback to the request whose
    context it was scheduled in (``call_later`` from a request); the server's own code (its
    tasks, its protocol callbacks) to ``<server>``; loopwatch's own to none of the app's
    books; a task no request started to its coroutine's name (``<task consume>``); anything
    else to ``<background>``. A request's code before it is routed (a
    middleware inside loopwatch) is ``<routing>``, or ``<unmatched>`` in an app with no
    router: the route it gets later is not known while the loop is held."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        own: RequestRecord,
        frame: Callable[[], FrameType | None],
        entry_codes: Callable[[], frozenset[CodeType]],
        timed_callback: Callable[[], RequestRecord | tuple[str, str] | None] = lambda: None,
    ) -> None:
        self._loop = loop
        self._own = own
        self._frame = frame
        self._entry_codes = entry_codes
        # the request of the plain callback the loop-time hook times now, if it knows one:
        # on uvloop no handle can be read, and loop time charges it there (one owner)
        self._timed_callback = timed_callback
        self.server_code = ServerCode()

    def owner(self) -> Owner:
        task = asyncio.current_task(self._loop)
        if task is not None:
            return self.task_owner(task)
        # a plain callback: read from the loop thread's stack (its Handle's context), else
        # the exact loop-time hook's answer, where it times one now (on uvloop the stack shows
        # no Handle; loop time charges the callback there: one answer)
        found: RequestRecord | str | tuple[str, str] | None = running_callback_owner(
            self._frame(), self.server_code, self._entry_codes()
        )
        if found is None:
            found = self._timed_callback()
        if isinstance(found, tuple):
            return _label_owner(found)
        if found is None or found is LIFESPAN:
            return BACKGROUND_OWNER
        if isinstance(found, str):
            return _SERVER
        return self._request_owner(found, None)

    def task_owner(self, task: asyncio.Task[Any]) -> Owner:
        """The owner of a step of ``task`` (the rule ``owner`` applies to the current task)."""
        found = self.task_request(task)
        return found if isinstance(found, Owner) else self._request_owner(found, task)

    def task_request(self, task: asyncio.Task[Any], on_loop: bool = False) -> RequestRecord | Owner:
        """``task_owner`` without its label: the request, else the placeholder owner. Takes
        no lock (reading a route's template does), so the loop thread's signal handler may
        call it inside any code (``on_loop``: the running step's context is the current one)."""
        if on_loop and not HAS_TASK_CONTEXT:
            record = CURRENT_REQUEST.get() or task_bound(task)
        else:  # before 3.12, read from the loop thread's stack: ``task`` is the running one
            record = owner_of(task, self._frame)
        if record is None or record is LIFESPAN:
            return _label_owner(task_label(task, self.server_code, record is LIFESPAN))
        if record is self._own or is_own(record):
            return _OWN
        return record

    def _request_owner(self, record: RequestRecord, task: asyncio.Task[Any] | None) -> Owner:
        if record is self._own or is_own(record):
            return _OWN
        return Owner(record, record, (record.method, record.owner_route()), task=task)
