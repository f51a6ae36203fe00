"""Loop time per owner: how long the loop thread ran code, and for which request.

Every callback the loop runs (a task step, an I/O callback, a timer) is timed on the loop
thread and charged to its owner, by ``attribute``'s rule: the request bound in its context
(``requests``), the server's own protocol work (``<server>``: reading and parsing bytes,
accepting connections, flushing writes), a task no request started (``<task consume>``) or
anything else (``<background>``). The sum over owners is the loop's busy time, so its rate
is the loop utilization (Node's ELU).

One hook per kind of loop, chosen at start:

- ``HandleHook``, pure-Python asyncio loops (any version): every callback, each task step
  included, runs through ``asyncio.events.Handle._run``; the hook wraps it, once per process,
  and times only the loops it was asked to.
- ``MonitoringHook``, any loop (uvloop) on 3.12+: ``sys.monitoring`` local events on the top
  coroutine code object of each task time every task step; on uvloop, also on the code of
  every callback scheduled through ``call_soon``/``call_later``/``call_at``/
  ``call_soon_threadsafe`` (``scheduling``). The server's own callbacks in C are not seen.
- ``SamplingHook``, uvloop on 3.10/3.11: no exact hook exists; the watchdog samples the
  loop's current task every check. Biased: it misses steps shorter than the sampling period.

Threads: the hook writes on the loop thread only (``RequestRecord.busy``, ``Accountant``'s
own floats); ``Accountant.drain`` reads them from the watchdog or a scrape, under a lock,
and books the difference per route. A callback still running is booked as it lasts, so a
hold of seconds shows in ``rate()`` while it happens.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from loopwatch.attribute import (
    BACKGROUND_LABEL,
    ServerCode,
    callback_label,
    code_label,
    task_label,
)
from loopwatch.requests import CURRENT_REQUEST, LIFESPAN, RequestRecord, owner_of, watch_tasks
from loopwatch.scheduling import SchedulingHook
from loopwatch.stall import OWN, UNMATCHED

__all__ = ["Accountant", "BusySink", "start_accounting"]

logger = logging.getLogger("loopwatch")

# books seconds for (method, route); the monitor passes one that writes its shards
BusySink = Callable[[tuple[str, str], float], None]

# the server's own code: its protocol callbacks and the steps of its own tasks
_server_code = ServerCode()

# a callback still running is booked live once it is this old (shorter ones at their end)
LIVE_AFTER = 0.05


class Accountant:
    """Loop time of one event loop, per owner. The hook writes; ``drain`` books."""

    # hot-path fields, written by the hook on the loop thread
    start: float | None  # perf_counter() when the running callback started, None between
    owner: RequestRecord | None  # the running callback's request, if its context had one
    bound: RequestRecord | None  # a request the running callback bound (its first step)
    bound_at: float  # perf_counter() when it bound it: the time before is not the request's
    # the running callback's label when no request owns it (``<server>``, ``<task ...>``)
    ownerless: tuple[str, str]
    # seconds of callbacks no request owned, per label (bounded: placeholders, task names)
    spent: dict[tuple[str, str], float]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sink: BusySink,
        kind: str,
        loop_frame: Callable[[], FrameType | None] = lambda: None,
    ) -> None:
        self.loop = loop
        # the loop thread's current frame, read by the sampling hook (its stack names the
        # running task's request before Python 3.12)
        self.loop_frame = loop_frame
        self.kind = kind  # "handle", "monitoring" or "sampling": what the hook can see
        self.exact = kind != "sampling"
        self.sees_server = kind == "handle"
        self.start = None
        self.owner = None
        self.bound = None
        self.bound_at = 0.0
        self.ownerless = BACKGROUND_LABEL
        self.spent = {}
        # finished requests whose last seconds are not booked yet (append: loop thread)
        self.finished: collections.deque[RequestRecord] = collections.deque()
        self._sink = sink
        self._lock = threading.Lock()
        self._booked: dict[tuple[str, str], float] = {}  # of ``spent``, what drain booked
        # the running callback as far as the live booking got: (its start, booked until)
        self._live: tuple[float, float] | None = None
        self._hook: _Hook | None = None
        self._undo: Callable[[], None] | None = None  # restores the task factory
        self._last_sample = time.perf_counter()

    def watch_code(self, code: CodeType) -> None:
        """Time the steps of a coroutine whose tasks the loop's task factory never sees
        (made with ``asyncio.Task`` itself: aiohttp's, started eagerly on 3.12+). Only the
        ``sys.monitoring`` hook needs it; the others see every step."""
        hook = self._hook
        if isinstance(hook, MonitoringHook):
            hook.watch_code(code)

    def bind(self, record: RequestRecord) -> None:
        """On the loop, from the callback that binds ``record`` (a request's first step):
        from now on, the callback's time is the request's."""
        self.bound_at = time.perf_counter()
        self.bound = record

    def running_owner(self) -> RequestRecord | tuple[str, str] | None:
        """From the watchdog: whom the exact hook charges the callback it times right now
        (the owner a live booking charges): its request, or the label it charges when no
        request owns it; None when it times none. Written before ``start`` on the loop
        thread, so a set ``start`` never pairs with an older callback's owner."""
        if self.start is None or not self.exact:
            return None
        return self.owner or self.bound or self.ownerless

    def finished_request(self, record: RequestRecord) -> None:
        """On the loop: ``record`` is over; its last loop time is booked at the next drain
        (work it left running queues it again). Kept till then without its scope."""
        record.settle()
        self.finished.append(record)

    # -- booking (watchdog or scrape thread) ---------------------------------------------

    def check(self) -> None:
        """Every watchdog check: sample (sampling hook), and book a long-running callback's
        time so far, so a hold of seconds shows while it lasts."""
        hook = self._hook
        if hook is not None and not self.exact:
            with self._lock:
                hook.sample(self)
        start = self.start
        if start is not None and time.perf_counter() - start >= LIVE_AFTER:
            with self._lock:
                self._book_running()

    def drain(self, in_flight: list[RequestRecord]) -> None:
        """Book what the loop ran since the last drain, per route (from the watchdog about
        four times a second, and before a scrape)."""
        with self._lock:
            self._book_running()
            finished = self.finished
            while finished:
                self._book_record(finished.popleft(), final=True)
            for record in in_flight:
                self._book_record(record, final=False)
            booked = self._booked
            for label, seconds in self.spent.copy().items():  # the loop thread may add one
                done = booked.get(label, 0.0)
                if seconds > done:
                    self._sink(label, seconds - done)
                    booked[label] = seconds

    def _book_record(self, record: RequestRecord, final: bool) -> None:
        busy = record.busy
        delta = busy - record.booked
        if delta <= 0.0:  # nothing new, or the live booking is ahead of the hook
            return
        route = record.current_route()
        if route is None:
            if not (final or record.done):
                return  # not routed yet: booked once it is
            route = UNMATCHED
        self._sink((record.method, route), delta)
        record.booked = busy

    def _book_running(self) -> None:
        """A callback that has run for a while is booked as it lasts, ahead of the hook."""
        start = self.start
        if start is None:
            self._live = None
            return
        now = time.perf_counter()
        if now - start < LIVE_AFTER:
            return
        owner, bound, bound_at = self.owner, self.bound, self.bound_at
        label = self.ownerless
        if self.start is not start:
            return  # it ended meanwhile: the hook has its exact time
        live = self._live
        since = live[1] if live is not None and live[0] == start else start
        if owner is None and bound is not None:
            # the callback bound a request as it ran: what came before is not the request's,
            # as the hook will charge it (see _finish)
            if since < bound_at:
                self._book_ownerless(label, bound_at - since)
                since = bound_at
            owner = bound
        seconds = now - since
        if owner is not None:
            if owner.route == OWN:
                return  # loopwatch's own work: never booked to the app
            # a long callback of a request not routed yet is a hold before routing: its
            # owner is the one its stall has (``<routing>``), as in every view
            self._sink((owner.method, owner.owner_route()), seconds)
            owner.booked += seconds
        else:
            self._book_ownerless(label, seconds)
        self._live = (start, now)

    def _book_ownerless(self, label: tuple[str, str], seconds: float) -> None:
        self._sink(label, seconds)
        self._booked[label] = self._booked.get(label, 0.0) + seconds

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove(self)
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


class _Hook:
    kind = ""

    def add(self, accountant: Accountant) -> bool:
        raise NotImplementedError

    def remove(self, accountant: Accountant) -> None:
        raise NotImplementedError

    def sample(self, accountant: Accountant) -> None:
        pass


def _finish(acct: Accountant, owner: RequestRecord | None, start: float, end: float) -> None:
    """End of a callback, on the loop thread. A callback that bound a request as it ran (the
    request's first step) is the request's from the binding on; before it, ownerless."""
    if owner is None:
        bound = acct.bound
        if bound is not None:
            bound_at = acct.bound_at
            if bound_at > start:
                _charge(acct, None, bound_at - start)
                start = bound_at
            owner = bound
    _charge(acct, owner, end - start)


def _charge(acct: Accountant, owner: RequestRecord | None, seconds: float) -> None:
    """End of a callback, on the loop thread: add its time to its owner."""
    if owner is not None:
        owner.busy += seconds
        if owner.done:  # work after the request ended (a task it spawned): book it too
            acct.finished.append(owner)
    else:
        spent = acct.spent
        label = acct.ownerless
        spent[label] = spent.get(label, 0.0) + seconds


# -- pure-Python asyncio: Handle._run ---------------------------------------------------


class HandleHook(_Hook):
    """Wraps ``asyncio.events.Handle._run`` once per process while any loop is accounted;
    other loops pay one dict lookup per callback. Removed when the last loop stops, unless
    something wrapped it after us (then it passes through and says so)."""

    kind = "handle"

    def __init__(self) -> None:
        self._loops: dict[asyncio.AbstractEventLoop, Accountant] = {}
        self._original: Callable[[asyncio.Handle], None] | None = None
        self._wrapper: Callable[[asyncio.Handle], None] | None = None
        self._lock = threading.Lock()

    def add(self, accountant: Accountant) -> bool:
        with self._lock:
            if self._wrapper is None:
                self._install()
            self._loops[accountant.loop] = accountant
        return True

    def remove(self, accountant: Accountant) -> None:
        with self._lock:
            if self._loops.get(accountant.loop) is accountant:
                del self._loops[accountant.loop]
            if self._loops or self._wrapper is None:
                return
            if asyncio.events.Handle._run is self._wrapper:
                asyncio.events.Handle._run = self._original  # type: ignore[assignment,method-assign]
                self._wrapper = self._original = None
            else:  # another tool wrapped it after us: ours stays, as a pass-through
                logger.info("loopwatch: Handle._run was wrapped after loopwatch; leaving a no-op")

    def _install(self) -> None:
        original = asyncio.events.Handle._run
        loops = self._loops
        perf_counter = time.perf_counter
        var = CURRENT_REQUEST
        lifespan = LIFESPAN
        label_of = callback_label
        server_code = _server_code

        def _run(self: asyncio.Handle) -> None:
            acct = loops.get(self._loop)  # type: ignore[attr-defined]
            if acct is None or acct.start is not None:  # not ours, or a nested run
                return original(self)
            owner = self._context.get(var)  # type: ignore[attr-defined]
            if owner is None or owner is lifespan:
                try:  # outside the app's callback, which must run whatever this does
                    acct.ownerless = label_of(self._callback, server_code, owner is lifespan)  # type: ignore[attr-defined]
                except Exception:
                    acct.ownerless = BACKGROUND_LABEL
                owner = None
            acct.owner = owner
            acct.bound = None
            start = acct.start = perf_counter()
            try:
                original(self)
            finally:
                end = perf_counter()
                acct.start = None
                _finish(acct, owner, start, end)

        _run.__loopwatch__ = True  # type: ignore[attr-defined]
        _run.__wrapped__ = original  # type: ignore[attr-defined]
        self._original = original
        self._wrapper = _run
        asyncio.events.Handle._run = _run  # type: ignore[method-assign]


# -- any loop on 3.12+: sys.monitoring ------------------------------------------------------


_TOOL_IDS = (3, 4, 2, 5, 1, 0)


class MonitoringHook(_Hook):
    """Times each task step with ``sys.monitoring`` local events on the top coroutine code
    object of each task (registered by the task factory as tasks are created), and each
    plain callback on uvloop the same way, on its code (registered as it is scheduled,
    ``scheduling``). A step starts when that frame starts or resumes and ends when it
    yields, returns or unwinds. A frame of such code running inside another step (awaited,
    or a callback's function called by a task) nests (a depth count), and does not end it.
    Takes a free tool id; if none is free, gives up and says so."""

    kind = "monitoring"

    EVENTS_LOCAL = 0
    NAME = "loopwatch"

    def __init__(self) -> None:
        self._loops: dict[int, Accountant] = {}  # loop thread id -> accountant
        # id(code) -> code: code objects compare by value (two coroutines with the same body in
        # two modules are equal), and each must get its own local events
        self._codes: dict[int, CodeType] = {}
        self._tool: int | None = None
        self._depth: dict[int, int] = {}
        self._failed_once = False
        self._lock = threading.Lock()
        self._callbacks = SchedulingHook(self.watch_code)

    def add(self, accountant: Accountant) -> bool:
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        with self._lock:
            if self._tool is None:
                # 3 and 4 are the ids no kind of tool has reserved (0: debuggers, 1: coverage,
                # 2: profilers, 5: optimizers); those only if nothing else is free
                tool = next((t for t in _TOOL_IDS if mon.get_tool(t) is None), None)
                if tool is None:
                    logger.warning(
                        "loopwatch: no free sys.monitoring tool id (all 6 in use); "
                        "loop time is not measured on this loop"
                    )
                    return False
                mon.use_tool_id(tool, self.NAME)
                ev = mon.events
                # the callbacks run inside the app's coroutines: nothing escapes them
                mon.register_callback(tool, ev.PY_START, self._on_start)
                mon.register_callback(tool, ev.PY_RESUME, self._on_start)
                mon.register_callback(tool, ev.PY_YIELD, self._on_end)
                mon.register_callback(tool, ev.PY_RETURN, self._on_end)
                mon.register_callback(tool, ev.PY_UNWIND, self._on_unwind)
                mon.register_callback(tool, ev.PY_THROW, self._on_throw)
                # not local events: global, and rare (exceptions, cancellation)
                mon.set_events(tool, ev.PY_UNWIND | ev.PY_THROW)
                self._tool = tool
            self._loops[threading.get_ident()] = accountant
            self._depth[threading.get_ident()] = 0
        self._callbacks.add(accountant.loop)  # a uvloop loop: its callbacks too
        return True

    def remove(self, accountant: Accountant) -> None:
        mon = sys.monitoring  # type: ignore[attr-defined,unused-ignore]
        self._callbacks.remove(accountant.loop)
        with self._lock:
            for ident, acct in list(self._loops.items()):
                if acct is accountant:
                    del self._loops[ident]
                    self._depth.pop(ident, None)
            if self._loops or self._tool is None:
                return
            tool, self._tool = self._tool, None
            for code in self._codes.values():
                mon.set_local_events(tool, code, 0)
            self._codes.clear()
            mon.set_events(tool, 0)
            for event in (
                mon.events.PY_START,
                mon.events.PY_RESUME,
                mon.events.PY_YIELD,
                mon.events.PY_RETURN,
                mon.events.PY_UNWIND,
                mon.events.PY_THROW,
            ):
                mon.register_callback(tool, event, None)
            mon.free_tool_id(tool)

    def watch_task(self, task: Any) -> None:
        """Called by the task factory on the loop thread for each new task; never raises
        into the app's ``create_task``."""
        try:
            code = getattr(task.get_coro(), "cr_code", None)
        except Exception:
            return
        if code is not None:
            self.watch_code(code)

    def watch_code(self, code: CodeType) -> None:
        """Time every run of ``code`` on a watched loop's thread as a step (a task's top
        coroutine, a callback's function). From any thread; raises nothing of its own."""
        if id(code) in self._codes:
            return
        ev = sys.monitoring.events  # type: ignore[attr-defined,unused-ignore]
        with self._lock:  # not while remove() frees the tool id
            tool = self._tool
            if tool is None or id(code) in self._codes:
                return
            self._codes[id(code)] = code
            sys.monitoring.set_local_events(  # type: ignore[attr-defined,unused-ignore]
                tool, code, ev.PY_START | ev.PY_RESUME | ev.PY_YIELD | ev.PY_RETURN
            )
            ident = threading.get_ident()
            acct = self._loops.get(ident)
            if acct is not None and acct.start is not None:
                self._nest_running(ident, code)

    def _nest_running(self, ident: int, code: CodeType) -> None:
        """``code`` was hooked inside a step on the loop thread: its frames running in that
        step (a function that schedules itself) will end without having started, so they
        count as nested, or the first to return would end the step. Only frames above the
        step's own (its top frame is the deepest hooked one: the others are counted in the
        depth already); frames below it called into the loop and outlive the step."""
        depth = self._depth.get(ident, 0)
        running = 0
        frame: FrameType | None = sys._getframe(2)
        while frame is not None:
            if frame.f_code is code:
                running += 1
            elif id(frame.f_code) in self._codes:
                if depth == 0:
                    break  # the step's top frame
                depth -= 1
            frame = frame.f_back
        if running:
            self._depth[ident] = self._depth.get(ident, 0) + running

    def _on_start(self, code: CodeType, offset: int) -> None:
        try:  # inside the app's coroutine: nothing may escape (no wrapper: it runs per step)
            ident = threading.get_ident()
            acct = self._loops.get(ident)
            if acct is None:
                return
            if acct.start is not None:  # the same code awaited inside a running step
                self._depth[ident] = self._depth.get(ident, 0) + 1
                return
            owner = CURRENT_REQUEST.get()
            if owner is None or owner is LIFESPAN:
                # the server's own task (its main loop, a connection before the app), a task
                # of the app's, or a plain callback's function
                acct.ownerless = code_label(code, _server_code, owner is LIFESPAN, acct.loop)
                owner = None
            acct.owner = owner
            acct.bound = None
            acct.start = time.perf_counter()
        except Exception:
            self._failed()

    def _on_end(self, code: CodeType, offset: int, value: object) -> None:
        try:
            ident = threading.get_ident()
            acct = self._loops.get(ident)
            if acct is None:
                return
            depth = self._depth.get(ident, 0)
            if depth:
                self._depth[ident] = depth - 1
                return
            start = acct.start
            if start is None:
                return
            end = time.perf_counter()
            acct.start = None
            _finish(acct, acct.owner, start, end)
        except Exception:
            self._failed()

    def _failed(self) -> None:
        if not self._failed_once:
            self._failed_once = True
            logger.exception("loopwatch: loop-time hook failed; carrying on")

    def _on_unwind(self, code: CodeType, offset: int, exc: BaseException) -> None:
        if id(code) in self._codes:
            self._on_end(code, offset, None)

    def _on_throw(self, code: CodeType, offset: int, exc: BaseException) -> None:
        if id(code) in self._codes:  # a task step that starts by throwing (cancellation)
            self._on_start(code, offset)


# -- uvloop on 3.10/3.11: sampling ----------------------------------------------------------


class SamplingHook(_Hook):
    """No exact hook: the watchdog asks the loop's current task at every check and charges
    the time since the previous check to its owner. Steps shorter than the check period are
    mostly missed, longer ones over- or under-counted by up to one period."""

    kind = "sampling"

    def add(self, accountant: Accountant) -> bool:
        return True

    def remove(self, accountant: Accountant) -> None:
        pass

    def sample(self, accountant: Accountant) -> None:
        now = time.perf_counter()
        elapsed = now - accountant._last_sample
        accountant._last_sample = now
        try:
            task = asyncio.current_task(accountant.loop)
        except RuntimeError:
            return
        if task is None:
            return
        owner = owner_of(task, accountant.loop_frame)
        if owner is None or owner is LIFESPAN:
            label = task_label(task, _server_code, owner is LIFESPAN)
            accountant.spent[label] = accountant.spent.get(label, 0.0) + elapsed
        elif owner.route is None and owner.current_route() is None:
            # a request not routed yet: its code now is a hold before routing, booked where
            # its stall is (``<routing>``), never moved to the route it gets later
            accountant._sink((owner.method, owner.unrouted), elapsed)
        else:
            owner.busy += elapsed  # no other writer on this loop: the hook is this thread
            if owner.done:  # a task it left running (a background task): book it too
                accountant.finished.append(owner)


_handle_hook = HandleHook()
_monitoring_hook: MonitoringHook | None = None
_sampling_hook = SamplingHook()
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Accountant] = (
    weakref.WeakKeyDictionary()
)


def _is_pure_python_loop(loop: asyncio.AbstractEventLoop) -> bool:
    return isinstance(loop, asyncio.BaseEventLoop)


def monitoring_hook() -> MonitoringHook | None:
    global _monitoring_hook
    if sys.version_info < (3, 12):
        return None
    if _monitoring_hook is None:
        _monitoring_hook = MonitoringHook()
    return _monitoring_hook


def start_accounting(
    loop: asyncio.AbstractEventLoop,
    sink: BusySink,
    *,
    loop_frame: Callable[[], FrameType | None],
    force: str | None = None,
) -> Accountant | None:
    """Start timing ``loop`` (call on its thread); None if no hook can run here."""
    hook: _Hook | None
    if force == "sampling":
        hook = _sampling_hook
    elif force == "monitoring" or (force is None and not _is_pure_python_loop(loop)):
        hook = monitoring_hook() or _sampling_hook
    else:
        hook = _handle_hook
    accountant = Accountant(loop, sink, hook.kind, loop_frame)
    if not hook.add(accountant):
        return None
    accountant._hook = hook
    if isinstance(hook, MonitoringHook):
        for task in asyncio.all_tasks(loop):  # those running now; new ones via the factory
            hook.watch_task(task)
        watch_tasks(loop, hook.watch_task)
        accountant._undo = functools.partial(watch_tasks, loop, None)
    _by_loop[loop] = accountant
    return accountant


def accountant_for(loop: asyncio.AbstractEventLoop) -> Accountant | None:
    return _by_loop.get(loop)
