"""``loopwatch.watch()``: watch the running loop of a program with no web framework (a queue
consumer, a bot, a scheduler)::

    async def main() -> None:
        with loopwatch.watch(metrics_port=9100):   # LoopWatchMiddleware's options
            await consume()

Stalls are found, timed, logged and counted, loop time and the profile kept, as in a web app;
the side port (``metrics_port``) serves them. There are no requests: a hold is owned by the
code outside any request (``<background>``).

It is ``LoopWatchMiddleware`` around no app, started at once on the running loop, so every
view is the same code. ``loopwatch run -- python prog.py`` calls it in the program's
``asyncio.run`` (``attach``).
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

from loopwatch.middleware import LoopWatchMiddleware

__all__ = ["Watching", "watch"]


async def _no_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Nothing is served through it."""


class Watching:
    """A running ``watch()``: ``stop()`` (or leaving its ``with`` block) stops it."""

    def __init__(self, middleware: LoopWatchMiddleware) -> None:
        self.middleware = middleware

    @property
    def metrics_url(self) -> str | None:
        """The side port's ``/metrics``, if ``metrics_port`` was given."""
        server = self.middleware.metrics_server
        return None if server is None else server.url

    def stop(self) -> None:
        self.middleware.close()

    def __enter__(self) -> Watching:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def watch(**options: Any) -> Watching:
    """Watch the running event loop now; ``options`` are ``LoopWatchMiddleware``'s (a bad one
    raises ``ConfigError`` here). Call it from the loop (in a coroutine)."""
    asyncio.get_running_loop()  # RuntimeError outside a running loop: say so at once
    middleware = LoopWatchMiddleware(_no_app, **options)
    if middleware.config_error is not None:  # built inside the loop: kept, raised here
        raise middleware.config_error
    middleware.start()
    return Watching(middleware)
