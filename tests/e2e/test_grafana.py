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
    PROMETHEUS_SERIES,
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
from tests.serving import free_port, serve

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


def _annotation_exprs() -> list[tuple[str, str]]:
    return [
        (f"annotation {a['name']!r}", a["expr"])
        for a in DASHBOARD_JSON["annotations"]["list"]
        if a.get("expr")
    ]


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
    assert EXPORTED["loopwatch_stall_seconds_total"] == "counter"
    assert EXPORTED["loopwatch_stalls_total"] == "counter"
    assert EXPORTED["loopwatch_stall_in_progress_seconds"] == "gauge"
    assert EXPORTED["loopwatch_requests_total"] == "counter"
    assert EXPORTED["loopwatch_current_stall_seconds"] == "gauge"
    assert EXPORTED["loopwatch_event_loops"] == "gauge"
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
    for where, expr in [*_exprs(), *_annotation_exprs(), *_rule_exprs()]:
        names = metric_names(substitute(expr, LINT_VALUES))
        assert names, f"{where} selects no metric: {expr}"
        unknown = names - EXPORTED.keys() - PROMETHEUS_SERIES
        assert not unknown, f"{where} uses {sorted(unknown)}, not exported by loopwatch: {expr}"


def test_every_dashboard_query_is_scoped_to_job_and_instance() -> None:
    # each selector of a loopwatch metric (or of Prometheus' own series about the target)
    # carries both matchers, so that one dashboard serves many services and instances
    # without mixing them
    names = "|".join(sorted(PROMETHEUS_SERIES))
    selector = re.compile(rf"\b(loopwatch_\w+|{names})\b(\{{[^}}]*\}})?")
    for where, expr in [*_exprs(), *_annotation_exprs()]:
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
    assert all(t["instant"] and t["format"] == "table" for t in table["targets"])
    # ranked on the live counter, and only routes that held the loop within the range: a
    # route that stalled only before it has an increase of 0 and no row
    assert re.fullmatch(
        r"topk\(\$top, sum by \(method, route\) \(increase\("
        r"loopwatch_stall_seconds_total\{[^}]*\}\[\$__range\]\)\) > 0\)",
        first["expr"],
    ), first["expr"]
    dropped = [t for t in table["transformations"] if t["id"] == "filterByValue"]
    assert dropped[0]["options"]["filters"][0]["fieldName"] == "Value #A"
    sort = [t for t in table["transformations"] if t["id"] == "sortBy"]
    assert sort and sort[0]["options"]["sort"][0]["desc"] is True


# A time-series (range) panel runs its query at every step: a bare topk() picks its top N
# again at each one, so a panel of "top 1" shows several series and a stacked total is no
# longer the loop's blocked share. Each topk must rank over the whole range, evaluated once
# at its end: `X and on (method, route) topk($top, ... increase(X[$__range] @ end()) ...)`.
_TOPK = re.compile(r"\b(topk|bottomk)\s*\(")


def _call_argument(expr: str, open_paren: int) -> str:
    depth = 0
    for i in range(open_paren, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return expr[open_paren + 1 : i]
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def range_topk_problems(panel: dict[str, Any]) -> list[str]:
    """Why ``panel``'s topk/bottomk calls would pick a different set at every step."""
    problems = []
    for target in panel["targets"]:
        if target.get("instant"):
            continue  # one evaluation: one set
        for match in _TOPK.finditer(target["expr"]):
            argument = _call_argument(target["expr"], match.end() - 1)
            if not re.search(r"\[\$__range\]\s*@\s*end\(\)", argument):
                problems.append(
                    f"{panel['title']!r} target {target['refId']}: {match.group(1)} in a range "
                    f"query must rank increase(...[$__range] @ end()): {target['expr']}"
                )
            elif not re.search(r"\band\s+on\s*\([^)]*\)\s*$", target["expr"][: match.start()]):
                problems.append(
                    f"{panel['title']!r} target {target['refId']}: use the fixed set as a "
                    f"filter, `X and on (...) {match.group(1)}(...)`: {target['expr']}"
                )
    return problems


@pytest.mark.parametrize(
    ("expr", "instant", "flagged"),
    [
        ("topk($top, sum by (route) (rate(x[$__rate_interval])))", False, True),
        ("topk($top, sum by (route) (increase(x[$__range])))", False, True),
        ("topk(5, sum by (route) (increase(x[$__range] @ end())))", False, True),
        (
            "rate(x[1m]) and on (route) topk(5, sum by (route) (increase(x[$__range] @ end())))",
            False,
            False,
        ),
        ("topk($top, sum by (route) (increase(x[$__range])))", True, False),
    ],
)
def test_topk_lint_rejects_a_bare_topk_in_a_range_panel(
    expr: str, instant: bool, flagged: bool
) -> None:
    panel = {"title": "t", "targets": [{"refId": "A", "expr": expr, "instant": instant}]}
    assert bool(range_topk_problems(panel)) is flagged


def test_range_panels_rank_topk_over_the_whole_range() -> None:
    problems = [problem for panel in PANELS for problem in range_topk_problems(panel)]
    assert problems == []
    assert sum(1 for p in PANELS if "topk" in str(p["targets"])) >= 3


_ZERO_FALLBACK = re.compile(r"\bor\s+(on\s*\(\s*\)\s*)?vector\(0\)\s*$")


def test_every_stat_shows_zero_and_its_last_value() -> None:
    stats = [p for p in PANELS if p["type"] == "stat"]
    assert len(stats) >= 4
    for panel in stats:
        # "No data" before the first stall would read as "unknown", not "none"; and the
        # newest point, not the last non-null one, so a target that stopped answering does
        # not keep showing its last healthy value
        assert panel["options"]["reduceOptions"]["calcs"] == ["last"], panel["title"]
        for target in panel["targets"]:
            assert _ZERO_FALLBACK.search(target["expr"]), (panel["title"], target["expr"])
            # `or vector(0)` next to labelled series would add a 0 beside them all the time
            if "by (" in target["expr"].split(" or ")[0]:
                assert "or on () vector(0)" in target["expr"], (panel["title"], target["expr"])


def test_share_panels_are_clamped_with_a_minimum_interval() -> None:
    shares = [p for p in PANELS if p["fieldConfig"]["defaults"].get("unit") == "percentunit"]
    assert len(shares) >= 4
    for panel in shares:
        for target in panel["targets"]:
            assert target["expr"].startswith("clamp_max("), (panel["title"], target["expr"])
        # a rate over fewer than a few scrapes jumps; Grafana never goes below this
        assert panel.get("interval") == "15s", panel["title"]


def test_share_panels_divide_by_the_loops_over_the_rate_window() -> None:
    # several workers behind one instance add up, and a count of instances drops at once
    # when one goes stale while its rate() lingers: every share divides by the loops
    # watched over the same window as its rate
    shares = [p for p in PANELS if p["fieldConfig"]["defaults"].get("unit") == "percentunit"]
    for panel in [*shares, *(p for p in PANELS if p["title"].startswith("Share of time"))]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert "count by (instance)" not in expr, (panel["title"], expr)
            assert re.search(
                r"last_over_time\(loopwatch_event_loops\{[^}]*\}\[\$__rate_interval\]\)", expr
            ), (panel["title"], expr)
            if "loopwatch_event_loop_busy_seconds_total" in expr:  # timed loops only
                assert 'loop_time!="off"' in expr, (panel["title"], expr)


def test_live_panels_read_the_live_counters_not_the_histogram() -> None:
    # the histogram's series is born holding its first stall and grows only when a stall
    # ends; panels on it must say so
    for panel in PANELS:
        exprs = " ".join(t["expr"] for t in panel["targets"])
        if "loopwatch_stall_duration_seconds" in exprs:
            assert (
                "when it ends" in panel["description"]
                or "once it is over" in (panel["description"])
            ), panel["title"]
    live = [
        "Share of time the loop is blocked, by instance",
        "Stalls per second",
        "Seconds blocked per second by route (top $top)",
        "Stalls per second by route (top $top)",
    ]
    for title in live:
        (panel,) = [p for p in PANELS if p["title"] == title]
        exprs = " ".join(t["expr"] for t in panel["targets"])
        assert "loopwatch_stall_duration_seconds" not in exprs, panel["title"]
        assert re.search(r"loopwatch_stalls?_(seconds_)?total", exprs), panel["title"]


def test_scrape_health_and_stall_tiles_per_instance_link_to_stalls() -> None:
    by_title = {p["title"]: p for p in PANELS}
    up = by_title["Targets up, by instance"]["targets"][0]["expr"]
    duration = by_title["Scrape duration, by instance"]["targets"][0]["expr"]
    assert up.startswith("max by (instance) (up{"), up
    assert duration.startswith("max by (instance) (scrape_duration_seconds{"), duration
    tiles = by_title["Stall in progress, by instance"]
    assert tiles["targets"][0]["legendFormat"] == "{{instance}}"
    # a target that does not answer shows as such, in red, not as its last 0
    assert "(max by (instance) (up{" in tiles["targets"][0]["expr"]
    (mapping,) = tiles["fieldConfig"]["defaults"]["mappings"]
    assert mapping["options"]["result"]["color"] == "red"
    for panel in (tiles, by_title["Targets up, by instance"]):
        urls = [link["url"] for link in panel["fieldConfig"]["defaults"]["links"]]
        assert "http://${__field.labels.instance}/stalls" in urls, panel["title"]
        assert urls[0] == "http://${__field.labels.instance}/", panel["title"]  # the live page


def test_firing_loopwatch_alerts_are_annotations() -> None:
    (annotation,) = [a for a in DASHBOARD_JSON["annotations"]["list"] if a.get("expr")]
    assert annotation["enable"] and annotation["datasource"]["uid"] == "${datasource}"
    assert annotation["expr"].startswith('ALERTS{alertname=~"Loopwatch.*", alertstate="firing"')


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
    assert "SUCCESS: 6 rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


_OLD_LAG_RULE = """histogram_quantile(0.99,
            sum by (job, instance, le) (rate(loopwatch_event_loop_lag_seconds_bucket[5m]))
          ) > 0.1"""


@pytest.mark.parametrize(
    ("old", "new", "alert"),
    [
        # the threshold raised: nothing fires
        (") > 10\n", ") > 1000\n", "LoopwatchRouteBlocksEventLoop"),
        # the rules before issue 11: the histogram misses a route's first stall and a freeze
        # that has not ended
        (
            "increase(loopwatch_stall_seconds_total[5m])",
            "increase(loopwatch_stall_duration_seconds_sum[5m])",
            "LoopwatchRouteBlocksEventLoop",
        ),
        (
            "rate(loopwatch_stall_seconds_total[5m])",
            "rate(loopwatch_stall_duration_seconds_sum[5m])",
            "LoopwatchEventLoopFrozen",
        ),
        # the lag p99 counts heartbeats: a loop blocked a third of the time stays below 1 ms
        (
            """clamp_max(
            sum by (job, instance) (rate(loopwatch_event_loop_lag_seconds_sum[5m]))
            / on (job, instance)
            (sum by (job, instance) (max_over_time(loopwatch_event_loops[5m])) > 0),
            1
          ) > 0.1""",
            _OLD_LAG_RULE,
            "LoopwatchEventLoopLagHigh",
        ),
        # without the fallback on the loop-wide gauge
        ("\n          or on (job, instance)\n", "\n          and on (job, instance)\n", None),
        ("up == 0\n", "up == 2\n", "LoopwatchTargetDown"),
        # an hour's window: a target hung for two hours stopped firing
        ("_count[1d])", "_count[1h])", "LoopwatchTargetDown"),
        # loop time: a saturated loop with no stall must still fire
        ("  ) > 0.9\n", "  ) > 1.5\n", "LoopwatchEventLoopSaturated"),
        # divided by instances, not loops: two workers at 46% each read as one loop at 92%
        (
            'max_over_time(loopwatch_event_loops{loop_time!="off"}[5m])',
            'max_over_time(loopwatch_event_loops{loop_time!="off"}[5m]) * 0 + 1',
            "LoopwatchEventLoopSaturated",
        ),
        (
            "_seconds_total[5m]))\n            / on (job, instance)\n"
            "            (sum by (job, instance) (max_over_time(loopwatch_event_loops[5m]))",
            "_seconds_total[5m]))\n            / on (job, instance)\n"
            "            (sum by (job, instance) (max_over_time(loopwatch_event_loops[5m]) * 0 + 1)",
            "LoopwatchEventLoopFrozen",
        ),
        (
            "_lag_seconds_sum[5m]))\n            / on (job, instance)\n"
            "            (sum by (job, instance) (max_over_time(loopwatch_event_loops[5m]))",
            "_lag_seconds_sum[5m]))\n            / on (job, instance)\n"
            "            (sum by (job, instance) (max_over_time(loopwatch_event_loops[5m]) * 0 + 1)",
            "LoopwatchEventLoopLagHigh",
        ),
        # the route's own age decides again: a holder that changed within a freeze hides it
        (
            "+ on (job, instance) group_left ()\n"
            "            max by (job, instance) (loopwatch_current_stall_seconds)\n",
            "+ on (job, instance) group_left ()\n"
            "            max by (job, instance) (loopwatch_stall_in_progress_seconds)\n",
            "LoopwatchLongStallInProgress",
        ),
    ],
)
def test_promtool_test_rules_catches_a_broken_rule(
    tmp_path: Path, old: str, new: str, alert: str | None
) -> None:
    # the unit tests can fail: with each rule as it was, or broken, they must
    rules = (GRAFANA / "alerts.yml").read_text()
    assert rules.count(old) == 1, old
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    (tmp_path / "alerts_test.yml").write_text((GRAFANA / "alerts_test.yml").read_text())
    result = _promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert result.returncode != 0, result.stdout
    assert (alert or "LoopwatchLongStallInProgress") in result.stdout + result.stderr


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


def test_stall_histogram_panels_show_exemplars() -> None:
    """Every query on the stall histogram's buckets asks Grafana for its exemplars (the
    culprit's trace and span ids, with OpenTelemetry on), and its panel shows them."""
    found = 0
    for panel in query_panels(load_dashboard()):
        for target in panel["targets"]:
            if "loopwatch_stall_duration_seconds_bucket" in metric_names(target["expr"]):
                found += 1
                assert target.get("exemplar") is True, (panel["title"], target["refId"])
                if panel["type"] == "heatmap":
                    assert panel["options"]["exemplars"]["color"], panel["title"]
    assert found >= 1


# -- the dashboard's queries evaluated by promtool on series that really happen ------------

# The Grafana variables as a 15 s scrape gives them: one job, every instance.
PROMQL_VALUES = {**LINT_VALUES, "job": "api", "__rate_interval": "1m", "__range": "10m"}


def _panel_expr(title_start: str, ref_id: str = "A") -> str:
    (panel,) = [p for p in PANELS if p["title"].startswith(title_start)]
    (target,) = [t for t in panel["targets"] if t["refId"] == ref_id]
    return substitute(target["expr"], PROMQL_VALUES)


def _promql_test(
    tmp_path: Path, series: dict[str, str], cases: list[dict[str, Any]]
) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` on promql_expr_test cases (no rules), 15 s between samples."""
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": k, "values": v} for k, v in series.items()],
                "promql_expr_test": cases,
            }
        ],
    }
    path = tmp_path / "dashboard_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return _promtool("test", "rules", str(path))


def _series(metric: str, instance: str, labels: str = "") -> str:
    """``metric{job="api",instance="<instance>:9100",<labels>}``."""
    inner = f'job="api",instance="{instance}:9100"' + (f",{labels}" if labels else "")
    return metric + "{" + inner + "}"


def test_blocked_by_route_stack_stays_below_one_when_an_instance_goes_stale(
    tmp_path: Path,
) -> None:
    # a is frozen for good (100%); b was frozen too, and its scrapes failed from 2m15s: its
    # series went stale while its rate() lingers over the window. The stack's total is the
    # share of the loops' time: at most 1 at every step.
    series = {
        _series("loopwatch_stall_seconds_total", "a", 'method="GET",route="/a"'): "0+15x20",
        _series("loopwatch_stall_seconds_total", "b", 'method="GET",route="/b"'): ("0+15x8 stale"),
        _series("loopwatch_event_loop_lag_seconds_count", "a"): "0+1x20",
        _series("loopwatch_event_loop_lag_seconds_count", "b"): "0+1500x8 stale",
        _series("loopwatch_event_loops", "a", 'loop_time="exact"'): "1x20",
        _series("loopwatch_event_loops", "b", 'loop_time="exact"'): "1x8 stale",
        _series("up", "a"): "1x20",
        _series("up", "b"): "1x8 0x12",
    }
    stack = _panel_expr("Seconds blocked per second by route")
    cases = [
        {"expr": f"sum({stack}) <= bool 1", "eval_time": t, "exp_samples": [{"value": 1}]}
        for t in ("2m", "2m15s", "2m30s", "2m45s", "3m", "3m15s", "4m")
    ]
    # and the per-instance share, the same way
    share = _panel_expr("Share of time the loop is blocked")
    cases.append(
        {
            "expr": f"max({share}) <= bool 1",
            "eval_time": "2m30s",
            "exp_samples": [{"value": 1}],
        }
    )
    result = _promql_test(tmp_path, series, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shares_are_per_loop_with_two_workers(tmp_path: Path) -> None:
    # instance w runs three workers (PROMETHEUS_MULTIPROC_DIR): the counters sum them. Each
    # loop is blocked 50%, busy 75% and late 25% of the time; instance s is one loop, blocked
    # and busy 25%. Divided by instances, w would read 150% and 225% (clamped to 100%).
    route_a, route_b = 'method="GET",route="/a"', 'method="GET",route="/b"'
    series = {
        _series("loopwatch_stall_seconds_total", "w", route_a): "0+22.5x40",
        _series("loopwatch_event_loop_busy_seconds_total", "w", route_a): "0+33.75x40",
        _series("loopwatch_event_loop_lag_seconds_sum", "w"): "0+11.25x40",
        _series("loopwatch_event_loops", "w", 'loop_time="exact"'): "3x40",
        _series("loopwatch_event_loops", "w", 'loop_time="off"'): "0x40",
        _series("loopwatch_stall_seconds_total", "s", route_b): "0+3.75x40",
        _series("loopwatch_event_loop_busy_seconds_total", "s", route_b): "0+3.75x40",
        _series("loopwatch_event_loop_lag_seconds_sum", "s"): "0+3.75x40",
        _series("loopwatch_event_loops", "s", 'loop_time="sampled"'): "1x40",
        _series("up", "w"): "1x40",
        _series("up", "s"): "1x40",
    }

    def case(title: str, samples: list[tuple[str, float]]) -> dict[str, Any]:
        return {
            "expr": _panel_expr(title),
            "eval_time": "5m",
            "exp_samples": [{"labels": labels, "value": value} for labels, value in samples],
        }

    w, s = '{instance="w:9100"}', '{instance="s:9100"}'
    a, b = "{" + route_a + "}", "{" + route_b + "}"
    cases = [
        case("Share of time the loop is blocked", [(w, 0.5), (s, 0.25)]),
        case("Event loop utilization", [(w, 0.75), (s, 0.25)]),
        case("Time the loop ran late", [(w, 0.25), (s, 0.25)]),
        # over both instances' four loops: 2.25 / 4 and 0.25 / 4 busy, 1.5 / 4 blocked
        case("Loop time by route", [(a, 0.5625), (b, 0.0625)]),
        case(
            "Seconds blocked per second by route",
            [(a, 0.375), (b, 0.0625)],
        ),
    ]
    result = _promql_test(tmp_path, series, cases)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_share_is_empty_for_a_first_stall(tmp_path: Path) -> None:
    # /first stalled once (wait): its histogram series is born holding that stall, so its
    # increase is 0 and its kind unknown: no value, not 0/0 = NaN. /cpu stalled twice more
    # after its first (cpu).
    series = {
        _series(
            "loopwatch_stall_duration_seconds_sum", "a", 'method="GET",route="/first",kind="wait"'
        ): "_x20 0.3x20",
        _series(
            "loopwatch_stall_duration_seconds_sum", "a", 'method="GET",route="/cpu",kind="cpu"'
        ): "0.5x10 1.5x30",
    }
    cases = [
        {
            "expr": _panel_expr("Worst routes", "E"),
            "eval_time": "10m",
            "exp_samples": [{"labels": '{method="GET",route="/cpu"}', "value": 1}],
        }
    ]
    result = _promql_test(tmp_path, series, cases)
    assert result.returncode == 0, result.stdout + result.stderr


STAT_TILES = (
    "Stall in progress, by instance",
    "Share of time the loop is blocked, by instance",
    "Stalls per second",
    "Requests in flight",
)


def test_stat_tiles_say_not_answering_for_a_hung_target(tmp_path: Path) -> None:
    # a hangs at 2m15s: its scrapes fail (up 0) and every loopwatch series goes stale. b
    # answers. With b deselected (a the only target), every tile says "not answering"
    # (-1, mapped to red text), not a green 0.
    series = {
        _series("up", "a"): "1x8 0x20",
        _series("loopwatch_current_stall_seconds", "a"): "0x8 stale",
        _series("loopwatch_stall_seconds_total", "a", 'method="GET",route="/a"'): ("0x8 stale"),
        _series("loopwatch_stalls_total", "a", 'method="GET",route="/a"'): "0x8 stale",
        _series("loopwatch_event_loops", "a", 'loop_time="exact"'): "1x8 stale",
        _series("loopwatch_requests_in_flight", "a"): "3x8 stale",
        _series("up", "b"): "1x28",
        _series("loopwatch_current_stall_seconds", "b"): "0x28",
        _series("loopwatch_stall_seconds_total", "b", 'method="GET",route="/a"'): "0x28",
        _series("loopwatch_stalls_total", "b", 'method="GET",route="/a"'): "0x28",
        _series("loopwatch_event_loops", "b", 'loop_time="exact"'): "1x28",
        _series("loopwatch_requests_in_flight", "b"): "2x28",
    }
    only_a = {**PROMQL_VALUES, "instance": "a:9100"}
    every = {**PROMQL_VALUES, "instance": ".+"}
    by_instance = set(STAT_TILES[:2])
    cases = []
    for title in STAT_TILES:
        (panel,) = [p for p in PANELS if p["title"] == title]
        expr = panel["targets"][0]["expr"]
        labels = '{instance="a:9100"}' if title in by_instance else "{}"
        # a alone, hung: not answering
        cases.append(
            {
                "expr": substitute(expr, only_a),
                "eval_time": "4m",
                "exp_samples": [{"labels": labels, "value": -1}],
            }
        )
        # a alone, healthy: its figure
        healthy = 3 if title.startswith("Requests") else 0
        cases.append(
            {
                "expr": substitute(expr, only_a),
                "eval_time": "1m",
                "exp_samples": [{"labels": labels, "value": healthy}],
            }
        )
        # both: a per-instance tile names a; a summed one shows b's figure
        if title in by_instance:
            both = [{"labels": '{instance="a:9100"}', "value": -1}]
            both.append({"labels": '{instance="b:9100"}', "value": 0})
        else:
            both = [{"labels": "{}", "value": 2 if title.startswith("Requests") else 0}]
        cases.append({"expr": substitute(expr, every), "eval_time": "4m", "exp_samples": both})
    result = _promql_test(tmp_path, series, cases)
    assert result.returncode == 0, result.stdout + result.stderr
    for title in STAT_TILES:
        (panel,) = [p for p in PANELS if p["title"] == title]
        (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
        assert mapping["options"]["result"]["text"] == "not answering", title
        assert mapping["options"]["from"] < -1 < mapping["options"]["to"] < 0, title
