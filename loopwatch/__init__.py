"""loopwatch: find the code that freezes an asyncio web server, while it happens.

``app.add_middleware(LoopWatchMiddleware)`` watches the event loop that serves the app and
names the route and line that hold it, in Prometheus metrics, a log line and ``on_stall``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loopwatch.config import ConfigError, Settings
from loopwatch.stall import (
    BACKGROUND,
    SERVER,
    UNMATCHED,
    Stall,
    clear_recent_stalls,
    recent_stalls,
)

if TYPE_CHECKING:
    from loopwatch.exposition import MetricsServer, metrics_app
    from loopwatch.middleware import LoopWatchMiddleware
    from loopwatch.monitor import Monitor
    from loopwatch.watching import watch

from loopwatch.version import __version__

__all__ = [
    "BACKGROUND",
    "SERVER",
    "UNMATCHED",
    "ConfigError",
    "LoopWatchMiddleware",
    "MetricsServer",
    "Monitor",
    "Settings",
    "Stall",
    "__version__",
    "clear_recent_stalls",
    "metrics_app",
    "recent_stalls",
    "watch",
]

# prometheus_client is imported only when these are first used, so `import loopwatch`
# stays cheap (the pytest plugin imports it in every test run).
_LAZY = {
    "LoopWatchMiddleware": "loopwatch.middleware",
    "MetricsServer": "loopwatch.exposition",
    "metrics_app": "loopwatch.exposition",
    "Monitor": "loopwatch.monitor",
    "watch": "loopwatch.watching",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loopwatch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
