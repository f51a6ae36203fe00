"""Reading a loopwatch exposition (a ``/metrics`` URL or a saved Prometheus text / OpenMetrics
file) and the stall ring served beside it at ``<metrics URL>/stalls``."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopwatch.cli.errors import PROG, CliError

__all__ = ["Exposition", "Snapshot", "load_snapshot", "parse_exposition"]


@dataclass
class Exposition:
    """What one scrape says, per (method, route)."""

    requests: dict[tuple[str, str], float] = field(default_factory=dict)
    # (method, route) -> kind -> [stalls, seconds]
    stalls: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    current_stall: float = 0.0
    lag_count: float = 0.0
    has_loopwatch: bool = False


def parse_exposition(text: str, source: str) -> Exposition:
    """Parse Prometheus text (or OpenMetrics) exposition; errors name the source."""
    from prometheus_client.parser import text_string_to_metric_families

    if re.search(r"^# EOF\s*$", text, re.MULTILINE):
        from prometheus_client.openmetrics.parser import (
            text_string_to_metric_families as openmetrics_families,
        )

        parse: Callable[[str], Any] = openmetrics_families
    else:
        parse = text_string_to_metric_families
    expo = Exposition()
    try:
        for family in parse(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, float(sample.value)
                if not name.startswith("loopwatch_"):
                    continue
                expo.has_loopwatch = True
                key = (labels.get("method", "-"), labels.get("route", "-"))
                if name == "loopwatch_requests_total":
                    expo.requests[key] = expo.requests.get(key, 0.0) + value
                elif name.startswith("loopwatch_stall_duration_seconds_"):
                    suffix = name.rsplit("_", 1)[1]
                    if suffix in ("count", "sum"):
                        kinds = expo.stalls.setdefault(key, {})
                        pair = kinds.setdefault(labels.get("kind", "-"), [0.0, 0.0])
                        pair[0 if suffix == "count" else 1] += value
                elif name == "loopwatch_current_stall_seconds":
                    expo.current_stall = value
                elif name == "loopwatch_event_loop_lag_seconds_count":
                    expo.lag_count = value
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on bad input
        raise CliError(f"{source} is not a Prometheus text exposition ({exc})") from None
    return expo


def _fetch(url: str, timeout: float) -> tuple[str, str]:
    """(body, content type) of GET url; a one-line CliError when it does not answer 200."""
    request = urllib.request.Request(
        url, headers={"Accept": "text/plain;version=0.0.4", "User-Agent": PROG}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode("utf-8", errors="replace")
            return body, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise CliError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        raise CliError(f"cannot read {url}: {exc}") from None


def _metrics_url(url: str) -> str:
    """A bare ``http://host:port`` means the usual ``/metrics`` path."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/metrics"))
    return url


@dataclass
class Snapshot:
    source: str
    expo: Exposition
    stalls: list[dict[str, Any]]  # the stall ring; empty when the source has none
    ring_source: str | None


def load_snapshot(source: str, timeout: float = 5.0) -> Snapshot:
    """Read a ``/metrics`` URL (and its ``/stalls`` ring) or a saved exposition file."""
    if source.startswith(("http://", "https://")):
        url = _metrics_url(source)
        text, _ = _fetch(url, timeout)
        expo = parse_exposition(text, url)
        if not expo.has_loopwatch:
            raise CliError(
                f"{url} answered, but without loopwatch metrics (no loopwatch_* samples): "
                "is LoopWatchMiddleware installed and metrics_app() mounted there?"
            )
        ring_url = url.split("?", 1)[0].rstrip("/") + "/stalls"
        ring: list[dict[str, Any]] = []
        try:
            body, content_type = _fetch(ring_url, timeout)
            if "json" in content_type:
                data = json.loads(body)
                ring = [s for s in data if isinstance(s, dict)] if isinstance(data, list) else []
        except (CliError, ValueError):
            pass  # an older loopwatch or another exporter: culprits show as "-"
        return Snapshot(url, expo, ring, ring_url if ring else None)
    path = Path(source)
    if not path.exists() and re.fullmatch(
        r"[\w.\-]+:\d+(/.*)?|\[[0-9a-fA-F:.]+\]:\d+(/.*)?", source
    ):
        return load_snapshot("http://" + source, timeout)  # host:port, as curl reads it
    if not path.is_file():
        raise CliError(
            f"{source!r} is neither an http(s) URL nor a readable file "
            "(expected e.g. http://127.0.0.1:8000/metrics or a saved exposition file)"
        )
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CliError(f"cannot read {source}: {exc.strerror or exc}") from None
    expo = parse_exposition(text, source)
    if not expo.has_loopwatch:
        raise CliError(f"{source} has no loopwatch metrics (no loopwatch_* samples)")
    return Snapshot(source, expo, [], None)
