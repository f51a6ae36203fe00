"""Names for the app's tasks that no request started: ``<task consume>``.

A hold, or loop time, outside any request belongs to the task whose step runs, named by its
coroutine function's qualified name (``Consumer.run``, ``main.<locals>.tick``): code, never a
per-task id or name the app may build from data (``outer.<locals>.inner`` is shown as
``outer.inner``). A process names at most ``MAX_TASK_NAMES``
coroutines; any further one is ``<other tasks>``, so a program that generates code (or a
plugin system) cannot grow the label sets without bound. Python 3.10's code objects have no
qualified name: there the coroutine's own is read.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from types import CodeType
from typing import Any, NamedTuple

from loopwatch.names import clip
from loopwatch.stall import OTHER_TASKS, SERVER

__all__ = ["MAX_TASK_NAMES", "TaskNames", "is_coroutine_code", "task_names"]

MAX_TASK_NAMES = 50
SERVER_LABEL = ("-", SERVER)
_ASYNCIO_DIR = os.path.join(os.path.dirname(asyncio.__file__), "")
# asyncio classes whose coroutine methods are the loop's machinery (BaseSelectorEventLoop,
# _SelectorTransport, SSLProtocol): not asyncio.wait_for and the like, which run app code
_MACHINERY = ("EventLoop", "Transport", "Protocol")
_MAX_QUALNAME = 100  # characters of the qualified name shown
_MAX_CODES = 10_000  # code objects remembered (each maps to one of the names above)


def is_coroutine_code(code: CodeType) -> bool:
    """An ``async def`` function's code (a task's top coroutine), not a plain callback's."""
    return bool(code.co_flags & inspect.CO_COROUTINE)


class TaskNames:
    """``("-", "<task qualname>")`` per coroutine code, capped. Read on the loop thread (the
    loop-time hooks, the profile's signal handler: no lock on a known code) and the
    watchdog's."""

    def __init__(self, cap: int = MAX_TASK_NAMES) -> None:
        self._cap = cap
        # a code's label, or where its frame holds the coroutine it runs (a library's task
        # wrapper: its tasks are named by what they run)
        self._by_code: dict[CodeType, tuple[str, str] | _Wrapped] = {}
        self._named: set[str] = set()

    def of_code(self, code: CodeType, qualname: str | None = None) -> tuple[str, str] | None:
        """The label of a task whose top coroutine runs ``code`` (``qualname``: the
        coroutine's, where the code has none: Python 3.10); None for a library's task
        wrapper, whose tasks are named from the coroutine (``of_coroutine``)."""
        known = self._by_code.get(code)
        if known is None:
            known = self._add(code, qualname or _qualname(code, None))
        return None if isinstance(known, _Wrapped) else known

    def of_coroutine(self, coro: Any) -> tuple[str, str] | None:
        """The label of a task running ``coro``; None if it is no ``async def`` coroutine."""
        for _ in range(4):  # a wrapper of a wrapper, at most this deep
            code = getattr(coro, "cr_code", None)
            if code is None:
                return None
            known = self._by_code.get(code)
            if known is None:
                known = self._add(code, _qualname(code, coro))
            if not isinstance(known, _Wrapped):
                return known
            coro = _wrapped(coro, known)
        return None

    def _add(self, code: CodeType, qualname: str) -> tuple[str, str] | _Wrapped:
        # no lock: the profile's signal handler may name a task inside any code of the loop
        # thread, this method included (two threads adding at once may pass the cap by one)
        wraps = _WRAPPERS.get(qualname)
        if wraps is not None and code.co_filename.replace("\\", "/").endswith(wraps.file):
            self._by_code[code] = wraps
            return wraps
        if code.co_filename.startswith(_ASYNCIO_DIR) and qualname.split(".")[0].endswith(
            _MACHINERY
        ):
            # the loop's own tasks (accepting a connection, resolving a server's address):
            # transport work, as its protocol callbacks are, never a task of the app's
            self._by_code[code] = SERVER_LABEL
            return SERVER_LABEL
        # ``outer.<locals>.inner`` reads as ``outer.inner``: as unique, and shorter
        name = f"<task {clip(qualname.replace('.<locals>.', '.'), _MAX_QUALNAME)}>"
        if name not in self._named:
            if len(self._named) >= self._cap:
                name = OTHER_TASKS
            else:
                self._named.add(name)
        label = ("-", name)
        if len(self._by_code) < _MAX_CODES:
            self._by_code[code] = label
        return label

    def clear(self) -> None:
        """Forget every name (tests)."""
        self._by_code.clear()
        self._named.clear()


def _qualname(code: CodeType, coro: Any) -> str:
    # the code's name where it has one (3.11+): the sys.monitoring hook sees only the code,
    # and a decorator may rename the function (functools.wraps), not its code
    qualname = getattr(code, "co_qualname", None) or getattr(coro, "__qualname__", None)
    return str(qualname or code.co_name)


class _Wrapped(NamedTuple):
    """A library's coroutine that runs the task's own: in ``file``, holding it in its frame's
    local ``local`` (or that local's ``attribute``)."""

    file: str
    local: str
    attribute: str | None = None


# Libraries that run each task's coroutine inside a wrapper coroutine of their own, by the
# wrapper's qualified name
_WRAPPERS = {
    # anyio 4.10+: every task group task
    "TaskHandle._run_coro": _Wrapped("anyio/_core/_tasks.py", "self", "_coro"),
    # anyio's blocking portal (Starlette's TestClient): what a thread asked the loop to run
    "BlockingPortal._call_func": _Wrapped("anyio/from_thread.py", "retval_or_awaitable"),
    # a task made of ``asyncio.wait_for(coro)``: 3.12+ runs the coroutine in the same task
    "wait_for": _Wrapped("asyncio/tasks.py", "fut"),
}


def _wrapped(coro: Any, where: _Wrapped) -> Any:
    """The coroutine a wrapper runs, read from its frame (None before it has it, or once it
    is done)."""
    frame = getattr(coro, "cr_frame", None)
    if frame is None:
        return None
    try:
        held = frame.f_locals.get(where.local)
        return held if where.attribute is None else getattr(held, where.attribute, None)
    except Exception:  # read across threads: a torn read names nothing
        return None


task_names = TaskNames()
