"""The files under grafana/: the dashboard JSON is importable and consistent with what loopwatch
exports, the alert rules pass promtool's checks and unit tests, and promtool accepts
loopwatch's /metrics output."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from loopwatch import LoopWatchMiddleware, metrics_app
from tests.helpers import StallLog
from tests.prom import (
    BUILTIN_VARIABLES,
    DASHBOARD,
    GRAFANA,
    all_panels,
    exported_metric_names,
    load_dashboard,
    metric_names,
    query_panels,
    require_tool,
    substitute,
    variable_references,
    variables,
)
from tests.servers import free_port, serve

DASHBOARD_JSON: dict[str, Any] = load_dashboard()
PANELS = query_panels(DASHBOARD_JSON)
EXPORTED = exported_metric_names()
# Concrete values for every variable, only to parse the expressions here.
LINT_VALUES = {
    "job": "lint",
    "instance": ".+",
    "datasource": "prometheus",
    "top": "10",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
}


def _exprs() -> list[tuple[str, str]]:
    """(where, expression) for every query in the dashboard, variable queries included."""
    out = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in PANELS
        for t in p["targets"]
    ]
    for v in variables(DASHBOARD_JSON):
        if v["type"] == "query":
            query = v["query"] if isinstance(v["query"], str) else v["query"]["query"]
            out.append((f"variable ${v['name']}", query))
    return out


def _rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    return [
        (f"alert {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


# -- metric-name extraction, checked on its own so the lint below can be trusted ----------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_bucket{job="x", le=~"0.1|1"}[5m]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum by (route, le) (rate(b_bucket[1m]))) > 1e-3", {"b_bucket"}),
        ("topk(10, x_total offset 5m) / on (job) group_left (route) y", {"x_total", "y"}),
        ('label_values(z_count{job="$job"}, instance)', {"z_count"}),
        ("label_values(job)", set()),
        ("increase(c[1h]) / scalar(sum(increase(c[1h]))) and bool d", {"c", "d"}),
    ],
)
def test_metric_names_extracts_the_selected_series(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exported_names_come_from_the_collector() -> None:
    assert EXPORTED["loopwatch_stall_duration_seconds_sum"] == "histogram"
    assert EXPORTED["loopwatch_requests_total"] == "counter"
    assert EXPORTED["loopwatch_current_stall_seconds"] == "gauge"
    assert all(name.startswith("loopwatch_") for name in EXPORTED)


# -- the dashboard ------------------------------------------------------------------------


def test_dashboard_is_importable_anywhere() -> None:
    d = DASHBOARD_JSON
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    assert d.get("id") is None, "an exported dashboard must not carry a database id"
    ds_vars = [v for v in variables(d) if v["type"] == "datasource"]
    assert [v["query"] for v in ds_vars] == ["prometheus"], "one Prometheus datasource variable"
    ds_ref = {"type": "prometheus", "uid": "${" + ds_vars[0]["name"] + "}"}
    for panel in PANELS:
        assert panel["datasource"] == ds_ref, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", ds_ref) == ds_ref, (panel["title"], target)
    for v in variables(d):
        if v["type"] == "query":
            assert v["datasource"] == ds_ref, v["name"]
    # no datasource uid of the machine it was exported from
    assert not re.search(r'"uid":\s*"(?!\$\{|loopwatch"|-- Grafana --")', DASHBOARD.read_text())


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    panels = all_panels(DASHBOARD_JSON)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_panel_explains_what_to_do() -> None:
    for panel in PANELS:
        assert len(panel.get("description", "")) >= 120, f"{panel['title']!r}: no description"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_every_query_uses_only_metrics_loopwatch_exports() -> None:
    for where, expr in [*_exprs(), *_rule_exprs()]:
        names = metric_names(substitute(expr, LINT_VALUES))
        assert names, f"{where} selects no metric: {expr}"
        unknown = names - EXPORTED.keys()
        assert not unknown, f"{where} uses {sorted(unknown)}, not exported by loopwatch: {expr}"


def test_every_dashboard_query_is_scoped_to_job_and_instance() -> None:
    # each selector of a loopwatch metric carries both matchers, so that one dashboard serves
    # many services and instances without mixing them
    selector = re.compile(r"(loopwatch_\w+)(\{[^}]*\})?")
    for where, expr in _exprs():
        if where.startswith("variable"):
            continue
        for match in selector.finditer(expr):
            matchers = match.group(2) or ""
            assert 'job="$job"' in matchers and 'instance=~"$instance"' in matchers, (
                f"{where}: {match.group(0)} is not scoped to $job and $instance"
            )


def test_every_variable_is_defined_and_used() -> None:
    defined = {v["name"] for v in variables(DASHBOARD_JSON)}
    used: set[str] = set()
    for panel in all_panels(DASHBOARD_JSON):
        used |= variable_references(str(panel))
    for v in variables(DASHBOARD_JSON):
        others = {k: val for k, val in v.items() if k not in ("name", "current", "options")}
        used |= variable_references(str(others)) - {v["name"]}
    assert defined - used == set(), f"variables never used: {sorted(defined - used)}"
    assert used - defined - BUILTIN_VARIABLES == set(), "variables used but not defined"


def test_instance_variable_allows_many_instances() -> None:
    by_name = {v["name"]: v for v in variables(DASHBOARD_JSON)}
    assert by_name["instance"]["multi"] and by_name["instance"]["includeAll"]
    assert "$job" in by_name["instance"]["query"]
    assert re.fullmatch(r"\.\+|\.\*", by_name["instance"]["allValue"])


def test_worst_routes_table_ranks_by_seconds_blocked() -> None:
    (table,) = [p for p in PANELS if p["type"] == "table"]
    first = table["targets"][0]
    assert first["instant"] and first["format"] == "table"
    assert (
        first["expr"].startswith("topk($top,")
        and "loopwatch_stall_duration_seconds_sum" in (first["expr"])
    )
    sort = [t for t in table["transformations"] if t["id"] == "sortBy"]
    assert sort and sort[0]["options"]["sort"][0]["desc"] is True


# -- provisioning and docker compose (Docker itself does not run here) ----------------------


def _yaml(name: str) -> Any:
    return yaml.safe_load((GRAFANA / name).read_text())


def test_compose_mounts_files_that_exist_where_provisioning_looks() -> None:
    compose = _yaml("docker-compose.yml")
    services = compose["services"]
    assert {"demo", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (GRAFANA / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert (GRAFANA / source).exists(), f"{name} mounts missing {source}"
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = _yaml("provisioning/dashboards/loopwatch.yml")["providers"][0]
    dashboard_dir = grafana_mounts["./loopwatch-dashboard.json"].rsplit("/", 1)[0]
    assert provider["options"]["path"] == dashboard_dir
    assert grafana_mounts["./provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = _yaml("provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert prom_mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    rule_files = _yaml("prometheus.yml")["rule_files"]
    assert [f"/etc/prometheus/{f}" for f in rule_files] == [prom_mounts["./alerts.yml"]]


def test_demo_image_copies_files_that_exist_and_are_not_ignored() -> None:
    dockerfile = (GRAFANA / "demo.Dockerfile").read_text()
    ignore = (GRAFANA / "demo.Dockerfile.dockerignore").read_text()
    allowed = {line[1:].removesuffix("/**") for line in ignore.splitlines() if line[:1] == "!"}
    sources = [
        src
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
    ]
    assert sources
    for src in sources:
        assert (GRAFANA.parent / src).exists(), src
        assert src in allowed, f"{src} is excluded by demo.Dockerfile.dockerignore"


def test_prometheus_config_scrapes_the_side_port_and_the_app() -> None:
    config = _yaml("prometheus.yml")
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    environment = (GRAFANA / "demo.Dockerfile").read_text()
    side_port = re.search(r"LOOPWATCH_METRICS_PORT=(\d+)", environment)
    assert side_port is not None
    assert sorted(t.split(":")[1] for ts in targets.values() for t in ts) == sorted(
        ["8000", side_port.group(1)]
    )


# -- promtool -----------------------------------------------------------------------------


def _promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    return subprocess.run(
        [promtool, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        cwd=GRAFANA,
        timeout=60,
    )


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules_catches_a_broken_rule(tmp_path: Path) -> None:
    # the unit tests can fail: with the route threshold raised they must
    rules = (GRAFANA / "alerts.yml").read_text()
    broken = rules.replace(") > 10\n", ") > 1000\n", 1)
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text((GRAFANA / "alerts_test.yml").read_text())
    result = _promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0
    assert "LoopwatchRouteBlocksEventLoop" in result.stdout + result.stderr


def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


STALL_SAMPLE = (
    'loopwatch_stall_duration_seconds_count{kind="wait",method="GET",route="/items/{item_id}"} 1.0'
)


def test_promtool_accepts_loopwatch_metrics_output(registry: CollectorRegistry) -> None:
    require_tool("promtool")
    log = StallLog()
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def blocking(item_id: int) -> dict[str, int]:
        time.sleep(0.3)  # a stall well above the 0.1 s threshold
        return {"item": item_id}

    side_port = free_port()
    app.add_middleware(LoopWatchMiddleware, registry=registry, metrics_port=side_port, on_stall=log)
    app.mount("/metrics", metrics_app(registry))
    with serve(app) as url:
        assert httpx.get(f"{url}/items/1", timeout=10).status_code == 200
        assert httpx.get(f"{url}/nowhere", timeout=10).status_code == 404
        log.wait_for(1)
        bodies = {
            "app /metrics": httpx.get(f"{url}/metrics", timeout=10).content,
            "side port /metrics": httpx.get(
                f"http://127.0.0.1:{side_port}/metrics", timeout=10
            ).content,
        }
    for where, body in bodies.items():
        text = body.decode()
        assert STALL_SAMPLE in text, where
        result = _promtool("check", "metrics", stdin=body)
        assert result.returncode == 0, f"{where}: {result.stdout}{result.stderr}"
        assert result.stdout.strip() == "" and result.stderr.strip() == "", where
