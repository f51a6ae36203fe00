"""uvloop's plain callbacks, made visible to the ``sys.monitoring`` loop-time hook (3.12+).

uvloop runs a callback from C: there is no ``Handle._run`` in Python to wrap, as there is on
a pure-Python loop. But ``uvloop.Loop`` is a Python subclass of its C loop, so its
``call_soon``, ``call_soon_threadsafe``, ``call_later`` and ``call_at`` can be wrapped on that
class while any uvloop loop is accounted. For a watched loop the wrapper hands the callback's
code object (a function's, a bound method's ``__func__``, a ``functools.partial``'s ``func``, a
Python ``__call__``) to the hook, which times each run of that code as a step, charged to the
request in the context the callback runs in (the one it was scheduled in). Callables without
Python code (C functions, Cython's, a task's step) have nothing to time; their type is
remembered, so the next one costs one set lookup. Other loops pass through at the cost of one
set lookup; uvloop's own C code calls its C methods directly and never sees the wrapper.

Removed when the last uvloop loop stops; a method someone wrapped after us keeps ours under
it, as a pass-through.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from collections.abc import Callable
from types import CodeType, FunctionType, MethodType
from typing import Any

__all__ = ["SchedulingHook", "code_of", "is_uvloop"]

logger = logging.getLogger("loopwatch")

# method -> whether a time (``delay``, ``when``) comes before the callback
_METHODS = {"call_soon": False, "call_soon_threadsafe": False, "call_later": True, "call_at": True}
_MISSING = object()


def is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    uvloop = sys.modules.get("uvloop")  # never imported here: a uvloop loop has loaded it
    cls = getattr(uvloop, "Loop", None)
    return isinstance(cls, type) and isinstance(loop, cls)


def code_of(callback: object, depth: int = 0) -> CodeType | None:
    """The Python code a call of ``callback`` starts with, if it has one."""
    kind = type(callback)
    if kind is FunctionType:
        return callback.__code__  # type: ignore[attr-defined,no-any-return]
    if depth > 4:  # a partial of a method of a partial...: far enough
        return None
    if kind is MethodType:
        return code_of(callback.__func__, depth + 1)  # type: ignore[attr-defined]
    if isinstance(callback, functools.partial):
        return code_of(callback.func, depth + 1)
    call = getattr(kind, "__call__", None)  # noqa: B004 - the function behind it
    if type(call) is FunctionType:  # an instance of a Python class with __call__
        return call.__code__
    return None


def _may_have_code(kind: type) -> bool:
    """Whether some callable of this type can carry Python code (so it is never skipped by
    type alone)."""
    if kind in (FunctionType, MethodType) or issubclass(kind, functools.partial):
        return True
    return type(getattr(kind, "__call__", None)) is FunctionType  # noqa: B004


class SchedulingHook:
    """Wraps ``uvloop.Loop``'s scheduling methods while any watched uvloop loop runs, and
    hands each callback's code to ``register`` (on the thread that schedules it)."""

    def __init__(self, register: Callable[[CodeType], None]) -> None:
        self._register = register
        self._loops: set[asyncio.AbstractEventLoop] = set()
        # types whose callables have no Python code: skipped with one set lookup
        self._plain: set[type] = set()
        # method -> (what uvloop.Loop's own dict had, or _MISSING; our wrapper)
        self._installed: dict[str, tuple[object, Callable[..., Any]]] = {}
        self._cls: type | None = None
        self._failed_once = False
        self._lock = threading.Lock()

    def add(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Watch ``loop``'s callbacks; False if it is not a uvloop loop."""
        if not is_uvloop(loop):
            return False
        with self._lock:
            if len(self._installed) < len(_METHODS):  # (one left under another's: kept)
                self._install(sys.modules["uvloop"].Loop)
            self._loops.add(loop)
        return True

    def remove(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loops.discard(loop)
            if self._loops or not self._installed or self._cls is None:
                return
            cls = self._cls
            for name, (had, wrapper) in list(self._installed.items()):
                if cls.__dict__.get(name) is not wrapper:
                    # another tool wrapped it after us: ours stays under it, passing through
                    logger.info(
                        "loopwatch: uvloop.Loop.%s was wrapped after loopwatch; leaving a no-op",
                        name,
                    )
                    continue
                if had is _MISSING:
                    delattr(cls, name)  # inherited from uvloop's C loop: nothing of ours left
                else:
                    setattr(cls, name, had)
                del self._installed[name]

    def _install(self, cls: type) -> None:
        self._cls = cls
        for name, timed in _METHODS.items():
            if name in self._installed:
                continue  # ours is still under a wrapper installed after it
            had = cls.__dict__.get(name, _MISSING)
            wrapper = self._wrap(getattr(cls, name), timed)
            self._installed[name] = (had, wrapper)
            setattr(cls, name, wrapper)

    def _wrap(self, original: Callable[..., Any], timed: bool) -> Callable[..., Any]:
        loops = self._loops
        plain = self._plain
        watch = self._watch

        # every task wakeup on uvloop comes through call_soon (asyncio's C tasks and futures
        # call loop.call_soon(step, context=...), (wakeup, future, context=...)): uvloop's
        # own signatures, and no argument tuple repacked for none or one (that costs 10x)
        def wrapper(loop: Any, callback: Any, *args: Any, context: Any = None) -> Any:
            if loop in loops and type(callback) not in plain:
                watch(callback)
            if not args:
                return original(loop, callback, context=context)
            if len(args) == 1:
                return original(loop, callback, args[0], context=context)
            return original(loop, callback, *args, context=context)

        def timed_wrapper(
            loop: Any, when: Any, callback: Any, *args: Any, context: Any = None
        ) -> Any:
            if loop in loops and type(callback) not in plain:
                watch(callback)
            if not args:
                return original(loop, when, callback, context=context)
            if len(args) == 1:  # asyncio.sleep(delay): (_set_result_unless_cancelled, future)
                return original(loop, when, callback, args[0], context=context)
            return original(loop, when, callback, *args, context=context)

        chosen: Callable[..., Any] = timed_wrapper if timed else wrapper
        functools.update_wrapper(chosen, original)
        chosen.__loopwatch__ = True  # type: ignore[attr-defined]
        return chosen

    def _watch(self, callback: object) -> None:
        """On the scheduling thread, inside the app's call: never raises into it."""
        try:
            code = code_of(callback)
            if code is not None:
                self._register(code)
            elif not _may_have_code(type(callback)):
                self._plain.add(type(callback))
        except Exception:
            if not self._failed_once:
                self._failed_once = True
                logger.exception("loopwatch: timing a uvloop callback failed; carrying on")
