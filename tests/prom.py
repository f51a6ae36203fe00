"""Helpers for the Grafana and Prometheus tests: the dashboard's queries, the metric names they
use, the ``prometheus``/``promtool`` binaries and a real Prometheus server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.metrics_core import Metric

from loopwatch.metrics import LoopwatchCollector
from loopwatch.stats import StatsBook
from tests.serving import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "loopwatch-dashboard.json"

# Grafana's built-in variables the dashboard may use without defining them.
BUILTIN_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "__interval_ms"})

# Series Prometheus itself writes for every target and alert: the dashboard and the rules may
# use them beside loopwatch's own (scrape health, firing alerts).
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "ALERTS"})


def require_tool(name: str) -> str:
    """The path of ``name``; skips the test when it is missing, fails under ``CI=true``."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = (
        f"{name!r} is not on PATH: install the Debian package 'prometheus' "
        "(apt-get install prometheus) to run the Grafana/Prometheus tests"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


# -- the dashboard ----------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


def all_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def query_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The panels that run queries (rows and text panels do not)."""
    return [p for p in all_panels(dashboard) if p.get("targets")]


def variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard.get("templating", {}).get("list", []))


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def variable_references(text: str) -> set[str]:
    """Names of the Grafana variables ``text`` uses, in all three syntaxes."""
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(text)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with every Grafana variable replaced; an unknown one is an error."""

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


# -- metric names in PromQL -------------------------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_NUMBER = re.compile(r"(?<![\w:])(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?\b")
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*),)?\s*(\w+)\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (or a Grafana ``label_values()``)."""
    lv = _LABEL_VALUES.match(expr)
    if lv is not None:
        return metric_names(lv.group(1)) if lv.group(1) else set()
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or aggregation: sum(, rate(, histogram_quantile(
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def _sample_names(family: Metric) -> set[str]:
    if family.type == "histogram":
        return {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
    if family.type == "counter":
        return {f"{family.name}_total"}
    return {family.name}


def exported_metric_names() -> dict[str, str]:
    """Every series name loopwatch exports, mapped to its family's type, as its collector
    describes them (the single source of truth, not a list kept here)."""
    book = StatsBook()
    book.request_metrics = True
    out: dict[str, str] = {}
    for family in LoopwatchCollector(book).describe():
        for name in _sample_names(family):
            out[name] = family.type
    return out


# -- a real Prometheus ------------------------------------------------------------------


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def api(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(
                f"Prometheus API {path} {params} answered {response.status_code}: {body}"
            )
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        """An instant query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        data = self.api("query", query=expr, time=f"{at:.3f}")
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(
        self, expr: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        """A range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, str]:
        """``job -> health`` of the active scrape targets."""
        data = self.api("targets", state="active")
        return {t["labels"]["job"]: t["health"] for t in data["activeTargets"]}


def finite_values(series: dict[str, Any]) -> list[float]:
    """The finite sample values of one instant or range query result."""
    pairs = series["values"] if "values" in series else [series["value"]]
    values = [float(v) for _, v in pairs]
    return [v for v in values if math.isfinite(v)]


@contextlib.contextmanager
def run_prometheus(config: Mapping[str, Any], workdir: Path) -> Iterator[PrometheusServer]:
    """Start ``prometheus`` with ``config`` on a free 127.0.0.1 port and its own data dir."""
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
                # stall histogram exemplars: the culprit's trace (OpenMetrics scrapes)
                "--enable-feature=exemplar-storage",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {process.returncode}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready within 30s:\n{server.log_tail()}")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(process)
