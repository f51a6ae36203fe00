"""The watchdog thread (``loopwatch-watchdog``): one per watched loop, it wakes every interval
and runs one check of the pipeline (detect, loop time, profile). It knows the loop it serves
only through the ``Checked`` protocol: it never imports the monitor.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

__all__ = ["Checked", "Watchdog"]

logger = logging.getLogger("loopwatch")


class Checked(Protocol):
    """What the watchdog drives (a ``Monitor``)."""

    @property
    def stalling(self) -> bool: ...

    def loop_closed(self) -> bool: ...

    def check(self, kept_out: float) -> None:
        """One check; ``kept_out``: how much later than asked the watchdog woke (it could not
        get the GIL, or a CPU). May raise (logged once, then ``reset``)."""

    def reset(self) -> None: ...

    def after_check(self, now: float) -> None:
        """Upkeep after each check: the heartbeat's health, multiprocess mirrors."""

    def finish(self) -> None:
        """After the last check, on this thread (the loop's last stall, hooks removed)."""


class Watchdog:
    """Runs ``checked.check`` every ``interval`` while the loop is held, less often while it
    is healthy (each wake-up of a thread costs CPU on an idle server). A hold is timed from
    the last heartbeat, so only the split of back-to-back holders can move, by at most the
    difference."""

    def __init__(
        self,
        checked: Checked,
        *,
        interval: float,
        threshold: float,
        clock: Callable[[], float],
        stop: threading.Event,
    ) -> None:
        self._checked = checked
        self._interval = interval
        self._relaxed = max(interval, min(threshold / 4, 2.5 * interval))
        self._clock = clock
        self._stop = stop
        self._failed = False
        self.checks = 0  # checks done; ``Monitor.settle`` waits for one more

    def run(self, started_at: float | None = None) -> None:
        """``started_at``: when the loop asked for this thread. A call that keeps the GIL
        from then on keeps this thread from starting too: its first check is that late."""
        checked, clock = self._checked, self._clock
        due = (clock() if started_at is None else started_at) + self._interval
        while not self._stop.wait(max(0.0, due - clock())):
            kept_out = clock() - due  # how much later than due: it waited for the GIL or a CPU
            if checked.loop_closed():
                break
            try:
                checked.check(kept_out)
            except Exception:
                if not self._failed:  # once, not 100 times a second
                    self._failed = True
                    logger.exception("loopwatch: watchdog check failed; carrying on")
                checked.reset()
            self.checks += 1
            wait = self._interval if checked.stalling else self._relaxed
            checked.after_check(clock())
            due = clock() + wait
        self._stop.set()
        checked.finish()
