"""Settings: explicit arguments, then ``LOOPWATCH_*`` environment variables, then defaults.

Every value is checked here, at construction, so a typo fails the deploy and never the
first request.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "APP_ENDPOINTS",
    "BOOLEAN_OPTIONS",
    "ENV_VARIABLES",
    "ConfigError",
    "Settings",
    "multiprocess_dir",
    "option_help",
    "resolve_app_endpoints",
]

_MISSING: Any = object()


class ConfigError(ValueError):
    """A bad option value; carries the option, the value, where it came from and what fits."""

    def __init__(self, option: str, value: object, source: str, expected: str) -> None:
        self.option = option
        self.value = value
        self.source = source
        self.expected = expected
        super().__init__(
            f"loopwatch: invalid {option}={value!r} (from {source}): expected {expected}"
        )


def _parse_float(text: str) -> float:
    return float(text)


def _parse_port(text: str) -> int | None:
    if text.strip().lower() in ("", "none", "off"):
        return None
    return int(text)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _parse_paths(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


# option name -> (environment variable, parser of its text)
_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "threshold": ("LOOPWATCH_THRESHOLD", _parse_float),
    "interval": ("LOOPWATCH_INTERVAL", _parse_float),
    "long_stall": ("LOOPWATCH_LONG_STALL", _parse_float),
    "metrics_port": ("LOOPWATCH_METRICS_PORT", _parse_port),
    "metrics_host": ("LOOPWATCH_METRICS_HOST", str),
    "request_metrics": ("LOOPWATCH_REQUEST_METRICS", _parse_bool),
    "exclude": ("LOOPWATCH_EXCLUDE", _parse_paths),
    "loop_time": ("LOOPWATCH_LOOP_TIME", _parse_bool),
    "otel": ("LOOPWATCH_OTEL", _parse_bool),
    "profile": ("LOOPWATCH_PROFILE", _parse_bool),
}

_ENV_EXPECTED = {
    "threshold": "a number of seconds",
    "interval": "a number of seconds",
    "long_stall": "a number of seconds",
    "metrics_port": "a port number from 1 to 65535, or 'none'",
    "metrics_host": "an IP address or host name",
    "request_metrics": "one of 1/0, true/false, yes/no, on/off",
    "exclude": "comma-separated paths starting with '/'",
    "loop_time": "one of 1/0, true/false, yes/no, on/off",
    "otel": "one of 1/0, true/false, yes/no, on/off",
    "profile": "one of 1/0, true/false, yes/no, on/off",
}

# option -> its environment variable; the options that are on/off
ENV_VARIABLES: dict[str, str] = {option: var for option, (var, _) in _ENV.items()}
BOOLEAN_OPTIONS = frozenset(o for o, (_, parse) in _ENV.items() if parse is _parse_bool)


def option_help(option: str) -> str:
    """What an option's value must be, as its environment variable takes it."""
    return _ENV_EXPECTED[option]


def multiprocess_dir(env: Mapping[str, str] | None = None) -> str | None:
    """prometheus_client's multiprocess directory (in ``env``, else this process's
    environment), when several workers share metrics."""
    env = os.environ if env is None else env
    # prometheus_client still honours the old lower-case name too
    legacy = env.get("prometheus_multiproc_dir")
    return env.get("PROMETHEUS_MULTIPROC_DIR") or legacy


# What ``metrics_app()`` (the app's own mount) serves; the side port always serves everything.
# all: everything; metrics: the Prometheus exposition only; summary: the exposition, and the
# stalls and the page with routes and durations but no code location (no culprit, stack,
# path or line; no /profile).
APP_ENDPOINTS = ("all", "metrics", "summary")
_APP_ENDPOINTS_ENV = "LOOPWATCH_APP_ENDPOINTS"
_APP_ENDPOINTS_EXPECTED = "one of 'all', 'metrics', 'summary'"


def resolve_app_endpoints(given: object = None, env: Mapping[str, str] | None = None) -> str:
    """``metrics_app(app_endpoints=...)``, else ``LOOPWATCH_APP_ENDPOINTS``, else ``all``;
    anything else is a ``ConfigError`` at once (the mount is built when the app is)."""
    env = os.environ if env is None else env
    if given is not None:
        value, source = given, "argument"
    elif _APP_ENDPOINTS_ENV in env:
        value, source = env[_APP_ENDPOINTS_ENV], f"environment variable {_APP_ENDPOINTS_ENV}"
    else:
        return "all"
    if not isinstance(value, str) or value.strip().lower() not in APP_ENDPOINTS:
        raise ConfigError("app_endpoints", value, source, _APP_ENDPOINTS_EXPECTED)
    return value.strip().lower()


# the watchdog's period is at most this fraction of the threshold
INTERVAL_RATIO = 3


@dataclass(frozen=True)
class Settings:
    """Validated options shared by the middleware, the monitor and the pytest plugin."""

    threshold: float = 0.1
    interval: float = 0.01
    long_stall: float = 5.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    request_metrics: bool = True
    exclude: tuple[str, ...] = ("/metrics",)
    loop_time: bool = True
    # OpenTelemetry: on when a real (SDK) provider is configured; False turns it off
    otel: bool = True
    profile: bool = True  # sample the loop's stacks per route for /profile
    # where each value came from, for error messages raised later (e.g. a busy port)
    sources: Mapping[str, str] | None = None

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **explicit: Any) -> Settings:
        """Build settings; an explicit argument (not ``_MISSING``/``None``) beats the env."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for option, (var, parse) in _ENV.items():
            given = explicit.pop(option, _MISSING)
            if given is not _MISSING and given is not None:
                values[option] = given
                sources[option] = "argument"
            elif var in env:
                text = env[var]
                try:
                    values[option] = parse(text)
                except ValueError:
                    raise ConfigError(
                        option, text, f"environment variable {var}", _ENV_EXPECTED[option]
                    ) from None
                sources[option] = f"environment variable {var}"
            else:
                sources[option] = "default"
        if explicit:
            raise TypeError(f"unexpected option(s): {', '.join(sorted(explicit))}")
        threshold = values.get("threshold")
        if "interval" not in values and isinstance(threshold, (int, float)) and threshold > 0:
            # a low threshold brings the default period down with it (see validate)
            values["interval"] = min(cls.interval, threshold / INTERVAL_RATIO)
        settings = cls(**values, sources=sources)
        settings.validate()
        return settings

    def source(self, option: str) -> str:
        return (self.sources or {}).get(option, "argument")

    def _fail(self, option: str, expected: str) -> ConfigError:
        return ConfigError(option, getattr(self, option), self.source(option), expected)

    def validate(self) -> None:
        for option in ("threshold", "interval", "long_stall"):
            value = getattr(self, option)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise self._fail(option, "a finite number of seconds above 0")
        if self.interval > self.threshold / INTERVAL_RATIO * (1 + 1e-9):  # 0.3 / 3 < 0.1
            # a hold opens once the heartbeat is 1.5 intervals late, and the healthy watchdog
            # looks every interval or more: above threshold/3 a hold just over the threshold
            # can end between two looks and go unseen
            raise ConfigError(
                "interval",
                self.interval,
                self.source("interval"),
                f"a number of seconds at most threshold/{INTERVAL_RATIO} "
                f"({self.threshold / INTERVAL_RATIO:.4g} for threshold={self.threshold!r})",
            )
        if self.long_stall <= self.threshold:
            raise ConfigError(
                "long_stall",
                self.long_stall,
                self.source("long_stall"),
                f"a number of seconds above threshold={self.threshold!r}",
            )
        port = self.metrics_port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
        ):
            raise self._fail(
                "metrics_port", "an integer port from 1 to 65535 (0 for any free port), or None"
            )
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            raise self._fail("metrics_host", "an IP address or host name")
        if self.metrics_host not in ("localhost",):
            try:
                ipaddress.ip_address(self.metrics_host)
            except ValueError:
                if not all(part.isalnum() or "-" in part for part in self.metrics_host.split(".")):
                    raise self._fail("metrics_host", "an IP address or host name") from None
        if not isinstance(self.request_metrics, bool):
            raise self._fail("request_metrics", "True or False")
        if not isinstance(self.loop_time, bool):
            raise self._fail("loop_time", "True or False")
        if not isinstance(self.otel, bool):
            raise self._fail("otel", "True or False")
        if not isinstance(self.profile, bool):
            raise self._fail("profile", "True or False")
        if isinstance(self.exclude, str) or not all(
            isinstance(p, str) and p.startswith("/") for p in self.exclude
        ):
            raise self._fail("exclude", "a sequence of paths starting with '/'")
        object.__setattr__(self, "exclude", tuple(self.exclude))
