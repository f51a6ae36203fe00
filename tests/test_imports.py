"""The public surface, and what ``import loopwatch`` costs."""

from __future__ import annotations

import json
import subprocess
import sys

import loopwatch


def test_public_surface_is_pinned() -> None:
    assert loopwatch.__all__ == sorted(loopwatch.__all__, key=lambda n: (not n.isupper(), n))
    assert set(loopwatch.__all__) == {
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
    }
    for name in loopwatch.__all__:
        assert getattr(loopwatch, name) is not None


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return set(json.loads(out.stdout))


def test_import_loopwatch_loads_no_web_framework_and_no_prometheus() -> None:
    loaded = _modules_after("import loopwatch")
    for framework in ("fastapi", "starlette", "uvicorn", "prometheus_client"):
        assert framework not in loaded, framework


def test_the_middleware_itself_needs_no_web_framework() -> None:
    loaded = _modules_after("from loopwatch import LoopWatchMiddleware, metrics_app")
    assert "prometheus_client" in loaded
    for framework in ("fastapi", "starlette", "uvicorn"):
        assert framework not in loaded, framework


def test_core_modules_import_only_the_standard_library() -> None:
    loaded = _modules_after("import loopwatch.monitor, loopwatch.attribution, loopwatch.config")
    assert "prometheus_client" not in loaded
