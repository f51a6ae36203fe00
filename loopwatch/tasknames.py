"""Names for the app's tasks that no request started: ``<task consume>``.

A hold, or loop time, outside any request belongs to the task whose step runs, named by its
coroutine function's qualified name (``Consumer.run``, ``main.<locals>.tick``): code, never a
per-task id or name the app may build from data (``outer.<locals>.inner`` is shown as
``outer.inner``). A process names at most ``MAX_TASK_NAMES``
coroutines; any further one is ``<other tasks>``, so a program that generates code (or a
plugin system) cannot grow the label sets without bound. The name is the coroutine's own
``__qualname__`` (a decorator with ``functools.wraps`` passes the function's on); only a reader
with nothing but the code (no task) uses the code's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import weakref
from types import CodeType
from typing import Any, NamedTuple

from loopwatch.names import clip
from loopwatch.stall import OTHER_TASKS, SERVER_LABEL

__all__ = ["MAX_TASK_NAMES", "TaskNames", "is_coroutine_code", "task_names"]

MAX_TASK_NAMES = 50
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
    loop-time hooks, the profile's signal handler: no lock) and the watchdog's."""

    def __init__(self, cap: int = MAX_TASK_NAMES) -> None:
        self._cap = cap
        # by the code's id (code objects compare by value: two modules' equal bodies are
        # equal; hashing one also hashes its bytecode) and the coroutine's own qualified name
        # (a decorator's wrapper code is shared by every function it wraps, and
        # ``functools.wraps`` names each coroutine after the function; on 3.10 code has no
        # name of its own): the code kept alive with its label, or with where its frame holds
        # the coroutine it runs (a library's task wrapper)
        self._by_code: dict[object, tuple[CodeType, tuple[str, str] | _Wrapped]] = {}
        self._named: set[str] = set()
        # a wrapper's task, named once by what it runs: every reader, at any moment of it
        # (before the wrapper holds the coroutine, or after it let it go), says the same
        self._by_task: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()

    def of_code(self, code: CodeType, qualname: str | None = None) -> tuple[str, str] | None:
        """The label of a task whose top coroutine runs ``code`` (``qualname``: the
        coroutine's, where the code has none: Python 3.10); None for a library's task
        wrapper, whose tasks are named from the task (``of_task``)."""
        known = self._known(code, qualname)
        return None if isinstance(known, _Wrapped) else known

    def of_task(self, task: Any, coro: Any) -> tuple[str, str] | None:
        """The label of ``task``, which runs ``coro``; None if that is no ``async def``
        coroutine."""
        code = getattr(coro, "cr_code", None)
        if code is None:
            return None
        known = self._known(code, getattr(coro, "__qualname__", None))
        if not isinstance(known, _Wrapped):
            return known
        try:
            named = self._by_task.get(task)
        except TypeError:  # not weak-referenceable: named afresh each time
            named = None
        if named is None:
            named = self.of_coroutine(_wrapped(coro, known))
            if named is not None:
                with contextlib.suppress(TypeError):
                    self._by_task[task] = named
        return named

    def of_coroutine(self, coro: Any) -> tuple[str, str] | None:
        """The label of a task running ``coro`` (or a coroutine function, before it runs);
        None if it is none."""
        for _ in range(4):  # a wrapper of a wrapper, at most this deep
            code = getattr(coro, "cr_code", None) or getattr(coro, "__code__", None)
            if code is None or not is_coroutine_code(code):
                return None
            known = self._known(code, getattr(coro, "__qualname__", None))
            if not isinstance(known, _Wrapped):
                return known
            coro = _wrapped(coro, known)
        return None

    def _known(self, code: CodeType, qualname: str | None) -> tuple[str, str] | _Wrapped:
        key = (id(code), qualname)
        entry = self._by_code.get(key)
        if entry is not None and entry[0] is code:
            return entry[1]
        return self._add(key, code, qualname or _qualname(code))

    def _add(self, key: object, code: CodeType, qualname: str) -> tuple[str, str] | _Wrapped:
        # no lock: the profile's signal handler may name a task inside any code of the loop
        # thread, this method included (two threads adding at once may pass the cap by one)
        found: tuple[str, str] | _Wrapped
        wraps = _WRAPPERS.get(qualname)
        if wraps is not None and code.co_filename.replace("\\", "/").endswith(wraps.file):
            found = wraps
        elif code.co_filename.startswith(_ASYNCIO_DIR) and qualname.split(".")[0].endswith(
            _MACHINERY
        ):
            # the loop's own tasks (accepting a connection, resolving a server's address):
            # transport work, as its protocol callbacks are, never a task of the app's
            found = SERVER_LABEL
        else:
            # ``outer.<locals>.inner`` reads as ``outer.inner``: as unique, and shorter
            name = f"<task {clip(qualname.replace('.<locals>.', '.'), _MAX_QUALNAME)}>"
            if name not in self._named:
                if len(self._named) >= self._cap:
                    name = OTHER_TASKS
                else:
                    self._named.add(name)
            found = ("-", name)
        if len(self._by_code) < _MAX_CODES:
            self._by_code[key] = (code, found)
        return found

    def clear(self) -> None:
        """Forget every name (tests)."""
        self._by_code.clear()
        self._named.clear()
        self._by_task.clear()


def _qualname(code: CodeType) -> str:
    return str(getattr(code, "co_qualname", None) or code.co_name)  # 3.10: no co_qualname


class _Wrapped(NamedTuple):
    """A library's coroutine that runs the task's own: in ``file``, holding it in its frame's
    local ``local`` (or that local's ``attribute``); before it has it, ``before`` holds the
    coroutine function it will call."""

    file: str
    local: str
    attribute: str | None = None
    before: str | None = None


# Libraries that run each task's coroutine inside a wrapper coroutine of their own, by the
# wrapper's qualified name
_WRAPPERS = {
    # anyio 4.10+: every task group task
    "TaskHandle._run_coro": _Wrapped("anyio/_core/_tasks.py", "self", "_coro"),
    # anyio's blocking portal (Starlette's TestClient): what a thread asked the loop to run
    "BlockingPortal._call_func": _Wrapped(
        "anyio/from_thread.py", "retval_or_awaitable", before="func"
    ),
    # a task made of ``asyncio.wait_for(coro)``: 3.12+ runs the coroutine in the same task
    "wait_for": _Wrapped("asyncio/tasks.py", "fut"),
}


def _wrapped(coro: Any, where: _Wrapped) -> Any:
    """The coroutine a wrapper runs, read from its frame (or the coroutine function it will
    call); None once it is done."""
    frame = getattr(coro, "cr_frame", None)
    if frame is None:
        return None
    try:
        local = frame.f_locals
        held = local.get(where.local)
        if held is not None and where.attribute is not None:
            held = getattr(held, where.attribute, None)
        if held is None and where.before is not None:
            held = local.get(where.before)
        return held
    except Exception:  # read across threads: a torn read names nothing
        return None


task_names = TaskNames()
