"""A timer on the loop thread's own CPU clock whose signal runs a handler on that thread.

Why: a sampler thread can look at the loop thread only when it gets the GIL, and the loop
thread lets the GIL go at its socket writes and in its selector, or every switch interval
(5 ms) when asked. Short CPU slices are therefore sampled at the next write, not where the time
went (asyncio, 1 ms slices: 47 points of a function's share lost to the socket write). A
signal handler runs on the loop thread itself, at the next bytecode boundary after the signal,
wherever the thread computes: an unbiased sample.

How: ``timer_create`` (through ctypes) on the loop thread's CPU clock
(``time.pthread_getcpuclockid``) with ``SIGEV_THREAD_ID``: the kernel signals that one thread,
only while it runs (an idle loop gets no signal, no wake-up), at each scheduler tick that finds
the period elapsed. The period (1 ms) is shorter than a tick (1-10 ms), so every tick that
finds the loop thread running samples it: ticks are regular in time, so samples are unbiased.
(A period longer than a tick is not: the first tick after it elapses favours the start of a
burst; measured 61/39 for two equal functions at 5 ms.) The handler gets the CPU seconds the
loop thread used since the last one, which a sample stands for.

The signal is ``SIGURG``: its default action is to ignore it, so a signal that outlives its
handler (another library replaced it) kills nothing. It is taken only when nobody handles it,
the loop runs on the main thread (Python runs signal handlers there only) and the platform is
64-bit Linux; ``SA_RESTART`` is set, so an interrupted read or write restarts. Elsewhere
``arm`` returns None and the caller samples another way.

Nothing here knows what a sample is: the handler is the caller's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

__all__ = ["HANDLER_CODE", "PERIOD", "SIGNAL", "CpuTimer", "arm", "restore_handler"]

logger = logging.getLogger("loopwatch")

SIGNAL = signal.SIGURG
PERIOD = 0.001  # shorter than any scheduler tick: every tick that finds the thread running
_SIGEV_THREAD_ID = 4  # Linux


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Sigevent(ctypes.Structure):
    # Linux's struct sigevent (64 bytes): the value, the signal, how to notify, the thread id;
    # the padding makes it at least as long as the kernel reads
    _fields_ = [
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_notify_thread_id", ctypes.c_int),
        ("_pad", ctypes.c_int * 16),
    ]


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    for name in (None, ctypes.util.find_library("rt")):  # glibc < 2.34: timer_* in librt
        try:
            lib = ctypes.CDLL(name, use_errno=True)
            lib.timer_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        except (OSError, AttributeError):
            continue
        lib.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p]  # fmt: skip
        lib.timer_delete.argtypes = [ctypes.c_void_p]
        return lib
    return None


_LIBC: ctypes.CDLL | bool | None = False  # False: not looked up yet
_armed: CpuTimer | None = None  # at most one: the main thread's
_busy = False  # the handler runs (on the main thread): a nested signal is dropped


class CpuTimer:
    """An armed timer and its handler. ``disarm`` from any thread; the signal's previous
    handler comes back when disarmed on the main thread (else at the next ``arm``, or never:
    the handler left is inert)."""

    def __init__(
        self, libc: ctypes.CDLL, timer: ctypes.c_void_p, handler: Callable[[FrameType, float], None]
    ) -> None:
        self._libc = libc
        self._timer: ctypes.c_void_p | None = timer
        self._handler = handler
        self._cpu = time.thread_time()  # the loop thread's: arm runs there
        self.samples = 0

    @property
    def armed(self) -> bool:
        return self._timer is not None and _armed is self

    def _tick(self, frame: FrameType) -> None:
        cpu = time.thread_time()
        spent, self._cpu = cpu - self._cpu, cpu
        self.samples += 1
        self._handler(frame, spent)

    def disarm(self) -> None:
        global _armed
        timer, self._timer = self._timer, None
        if timer is not None:
            self._libc.timer_delete(timer)  # first: no signal comes after this
        if _armed is self:
            _armed = None
            _restore()


def _dispatch(signum: int, frame: FrameType | None) -> None:
    """The signal's Python handler, on the main thread between two bytecodes of whatever it
    runs: nothing may escape into the app's code."""
    global _busy
    timer = _armed
    if timer is None or frame is None or _busy:
        return  # a signal that came while the handler ran (logging, say) runs nothing
    _busy = True
    try:
        timer._tick(frame)
    except Exception:
        timer.disarm()  # first: the log line takes long enough for more signals
        logger.exception("loopwatch: the profile's CPU-time sample failed; sampling stops")
    finally:
        _busy = False


HANDLER_CODE = _dispatch.__code__  # a frame of it on the loop thread: inside the handler


def _restore() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set a handler: the inert one stays
    try:
        if signal.getsignal(SIGNAL) is _dispatch:
            # what ``arm`` found: the default (a handler set outside Python, which reads as
            # None, cannot be put back from Python either)
            signal.signal(SIGNAL, signal.SIG_DFL)
    except (ValueError, OSError):  # not the main interpreter
        pass


def arm(handler: Callable[[FrameType, float], None], period: float = PERIOD) -> CpuTimer | None:
    """On the loop's thread: call ``handler(frame, cpu_seconds)`` on it at each tick of its
    CPU clock (``frame`` is where it was, ``cpu_seconds`` its CPU since the last call). None
    where that cannot be done here (see the module's docstring)."""
    global _LIBC, _armed
    if _armed is not None or threading.current_thread() is not threading.main_thread():
        return None
    if _LIBC is False:
        _LIBC = _libc()
    libc = _LIBC
    if not isinstance(libc, ctypes.CDLL):
        return None
    try:
        current = signal.getsignal(SIGNAL)
        if current is not _dispatch:
            if current not in (signal.SIG_DFL, None):
                logger.debug("loopwatch: SIGURG has a handler: the profile samples by thread")
                return None
            signal.signal(SIGNAL, _dispatch)
        signal.siginterrupt(SIGNAL, False)  # SA_RESTART: a read or write is resumed
        clock = time.pthread_getcpuclockid(threading.get_ident())
    except (ValueError, OSError, AttributeError):
        restore_handler()
        return None
    event = _Sigevent()
    event.sigev_signo = SIGNAL
    event.sigev_notify = _SIGEV_THREAD_ID
    event.sigev_notify_thread_id = threading.get_native_id()
    timer = ctypes.c_void_p()
    if libc.timer_create(clock, ctypes.byref(event), ctypes.byref(timer)) != 0:
        logger.debug("loopwatch: timer_create failed (errno %d)", ctypes.get_errno())
        restore_handler()
        return None
    armed = CpuTimer(libc, timer, handler)
    _armed = armed
    nanoseconds = max(1, round(period * 1e9))
    spec = _Itimerspec(_Timespec(*divmod(nanoseconds, 10**9)),
                       _Timespec(*divmod(nanoseconds, 10**9)))  # fmt: skip
    if libc.timer_settime(timer, 0, ctypes.byref(spec), None) != 0:
        armed.disarm()
        return None
    return armed


def restore_handler() -> None:
    """On the main thread, with no timer armed: the signal's handler from before ``arm``
    (a timer disarmed off the main thread left its inert handler)."""
    if _armed is None:
        _restore()


def _after_fork_in_child() -> None:
    # a timer is not inherited by a child: the one the parent armed is not the child's
    global _armed
    if _armed is not None:
        _armed._timer = None
        _armed = None
        _restore()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
