"""The plugin's options: command line, environment, ini file and the ``loopwatch`` marker,
each checked once with an error that names the option, the value and what was expected."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest

from loopwatch.config import ConfigError, Settings

__all__ = [
    "ENV_ENABLE",
    "MARKER_HELP",
    "Options",
    "pytest_addoption",
    "read_marker",
    "read_options",
]

ENV_ENABLE = "LOOPWATCH_PYTEST"
DEFAULT_THRESHOLD = Settings.threshold

MARKER_HELP = (
    "loopwatch(threshold=None, allow=False): loopwatch's event loop guard for this test: "
    "threshold=<seconds> overrides --loopwatch-threshold, allow=True lets the test block."
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_BOOL_EXPECTED = "one of 1/0, true/false, yes/no, on/off"
_SECONDS_EXPECTED = "a finite number of seconds above 0"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopwatch", "fail tests that block the asyncio event loop")
    group.addoption(
        "--loopwatch",
        action="store_true",
        default=False,
        help=f"fail each test during which the event loop is blocked past the threshold "
        f"(also: ini loopwatch = true, or {ENV_ENABLE}=1).",
    )
    group.addoption(
        "--loopwatch-threshold",
        metavar="SECONDS",
        default=None,
        help=f"blocking longer than this fails the test (default {DEFAULT_THRESHOLD}); "
        "implies --loopwatch.",
    )
    group.addoption(
        "--loopwatch-report",
        metavar="FILE",
        default=None,
        help="write every stall as JSON to FILE (for CI artefacts); implies --loopwatch.",
    )
    group.addoption(
        "--loopwatch-gc",
        metavar="VERDICT",
        default=None,
        help="a stall the garbage collector made for the most part: 'report' it without "
        "failing the test (default) or 'fail' it like any other.",
    )
    parser.addini("loopwatch", "enable loopwatch's event loop guard (true/false)", default="")
    parser.addini(
        "loopwatch_gc", "loopwatch: report (default) or fail a stall made by the GC", default=""
    )
    parser.addini(
        "loopwatch_threshold", "loopwatch: seconds of blocking that fail a test", default=""
    )
    parser.addini("loopwatch_report", "loopwatch: JSON report file of every stall", default="")


@dataclass(frozen=True)
class Options:
    enabled: bool
    threshold: float
    report: str | None
    threshold_source: str = "default"
    gc_fails: bool = False  # a stall the garbage collector made fails its test too


def parse_bool(text: str, source: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError("loopwatch", text, source, _BOOL_EXPECTED)


def parse_seconds(value: object, source: str, option: str = "threshold") -> float:
    if isinstance(value, bool):
        raise ConfigError(option, value, source, _SECONDS_EXPECTED)
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(option, value, source, _SECONDS_EXPECTED) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(option, value, source, _SECONDS_EXPECTED)
    return seconds


def read_options(config: pytest.Config) -> Options:
    """Command line beats the environment, which beats the ini file."""
    cli_threshold: str | None = config.getoption("loopwatch_threshold")
    cli_report: str | None = config.getoption("loopwatch_report")
    ini_enabled = str(config.getini("loopwatch"))
    if config.getoption("loopwatch") or cli_threshold is not None or cli_report is not None:
        enabled = True
    elif ENV_ENABLE in os.environ:
        enabled = parse_bool(os.environ[ENV_ENABLE], f"environment variable {ENV_ENABLE}")
    else:
        enabled = parse_bool(ini_enabled, "ini key loopwatch")
    if not enabled:
        return Options(False, DEFAULT_THRESHOLD, None)
    ini_threshold = str(config.getini("loopwatch_threshold")).strip()
    source = "default"
    threshold = DEFAULT_THRESHOLD
    if cli_threshold is not None:
        source = "command line option --loopwatch-threshold"
        threshold = parse_seconds(cli_threshold, source)
    elif ini_threshold:
        source = "ini key loopwatch_threshold"
        threshold = parse_seconds(ini_threshold, source)
    report = cli_report or str(config.getini("loopwatch_report")).strip() or None
    cli_gc: str | None = config.getoption("loopwatch_gc")
    if cli_gc is not None:
        gc_fails = parse_gc(cli_gc, "command line option --loopwatch-gc")
    else:
        ini_gc = str(config.getini("loopwatch_gc")).strip()
        gc_fails = parse_gc(ini_gc, "ini key loopwatch_gc") if ini_gc else False
    return Options(True, threshold, report, source, gc_fails)


def parse_gc(text: str, source: str) -> bool:
    """``report`` (False) or ``fail`` (True)."""
    lowered = text.strip().lower()
    if lowered not in ("report", "fail"):
        raise ConfigError("loopwatch-gc", text, source, "report or fail")
    return lowered == "fail"


def read_marker(item: pytest.Item, marker: pytest.Mark, default: float) -> tuple[float, bool]:
    """(threshold, allow) of a test's ``@pytest.mark.loopwatch``."""
    source = f"@pytest.mark.loopwatch on {item.nodeid}"
    if marker.args:
        raise ConfigError("loopwatch", marker.args, source, "keyword arguments threshold=, allow=")
    unknown = sorted(set(marker.kwargs) - {"threshold", "allow"})
    if unknown:
        raise ConfigError(unknown[0], marker.kwargs[unknown[0]], source, "threshold= or allow=")
    threshold = default
    if marker.kwargs.get("threshold") is not None:
        threshold = parse_seconds(marker.kwargs["threshold"], source)
        settings_for(threshold)  # the interval must fit below it
    allow = marker.kwargs.get("allow", False)
    if not isinstance(allow, bool):
        raise ConfigError("allow", allow, source, "True or False")
    return threshold, allow


_settings: dict[float, Settings] = {}


def settings_for(threshold: float) -> Settings:
    """The monitor's settings for a threshold (its interval fits below it)."""
    settings = _settings.get(threshold)
    if settings is None:
        settings = Settings(
            threshold=threshold,
            interval=min(Settings.interval, threshold / 4),
            long_stall=max(Settings.long_stall, threshold * 2),
            sources={"threshold": "pytest plugin", "interval": "pytest plugin"},
        )
        settings.validate()
        _settings[threshold] = settings
    return settings
