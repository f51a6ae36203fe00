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

import inspect
from types import CodeType
from typing import Any

from loopwatch.names import clip
from loopwatch.stall import OTHER_TASKS

__all__ = ["MAX_TASK_NAMES", "TaskNames", "is_coroutine_code", "task_names"]

MAX_TASK_NAMES = 50
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
        self._by_code: dict[CodeType, tuple[str, str]] = {}
        self._named: set[str] = set()

    def of_code(self, code: CodeType, qualname: str | None = None) -> tuple[str, str]:
        """The label of a task whose top coroutine runs ``code`` (``qualname``: the
        coroutine's, where the code has none: Python 3.10)."""
        known = self._by_code.get(code)
        if known is not None:
            return known
        return self._add(code, qualname or str(getattr(code, "co_qualname", code.co_name)))

    def of_coroutine(self, coro: Any) -> tuple[str, str] | None:
        """The label of a task running ``coro``; None if it is no ``async def`` coroutine."""
        code = getattr(coro, "cr_code", None)
        if code is None:
            return None
        known = self._by_code.get(code)
        if known is not None:
            return known
        # the code's name where it has one (3.11+): the sys.monitoring hook sees only the code,
        # and a decorator may rename the function (functools.wraps), not its code
        qualname = getattr(code, "co_qualname", None) or getattr(coro, "__qualname__", None)
        return self._add(code, str(qualname or code.co_name))

    def _add(self, code: CodeType, qualname: str) -> tuple[str, str]:
        # no lock: the profile's signal handler may name a task inside any code of the loop
        # thread, this method included (two threads adding at once may pass the cap by one)
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


task_names = TaskNames()
