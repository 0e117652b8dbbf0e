"""The alerting rules and the Grafana dashboard under deploy/, checked as code.

promtool (Debian's ``prometheus`` package; ``scripts/test-services`` installs it)
validates the rules and the scrape config and runs the rules' unit tests. The
other checks need only Python: every alert is tested firing and quiet, carries
a severity and its annotations, and every metric the rules and the dashboard
read is one the service exposes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service import metrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RULE_TESTS = sorted(PROMETHEUS_DIR.glob("*_test.yml"))
DASHBOARD = REPO / "deploy" / "grafana" / "nbo.json"
ON_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

METRIC_NAME = re.compile(r"\bnbo_[a-z0-9_]+")
SEVERITIES = {"critical", "warning", "info"}

# Series names a metric of each type exposes, from its family name (a counter's family
# name has no _total; a histogram's series are its _bucket, _count and _sum).
_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}

# The dashboard must show each of these (the panels issue 16 asked for).
DASHBOARD_MUST_READ = {
    "nbo_decisions_total",
    "nbo_http_request_duration_seconds_bucket",
    "nbo_http_request_duration_seconds_count",
    "nbo_offers_total",
    "nbo_offer_outcomes_total",
    "nbo_conversion_ratio",
    "nbo_uplift_conversion_ratio",
    "nbo_nps_score",
    "nbo_model_active_info",
    "nbo_model_age_seconds",
    "nbo_audit_spool_backlog_records",
    "nbo_audit_dead_letter_records",
    "nbo_worker_resident_memory_bytes",
}


def promtool_or_skip() -> str:
    """The promtool executable; a skip without it, a failure under CI."""
    executable = shutil.which("promtool")
    if executable is None:
        message = (
            "promtool is not installed (scripts/test-services installs it: "
            "apt-get install prometheus)"
        )
        if ON_CI:
            pytest.fail(f"{message}; it is required on CI")
        pytest.skip(message)
    return executable


def exposed_series_names() -> set[str]:
    """Every series name service.metrics can expose: its metrics and its collectors
    (gauges computed at scrape time), as they describe themselves."""
    names: set[str] = set()
    for value in vars(metrics).values():
        # A metric or a collector object (a class has describe too, unbound).
        if callable(getattr(value, "describe", None)) and not isinstance(value, type):
            for family in value.describe():
                names.update(family.name + suffix for suffix in _SERIES_SUFFIXES[family.type])
    return names


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def rule_test_cases() -> Iterator[dict[str, Any]]:
    """Every ``alert_rule_test`` entry of the promtool test files."""
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            yield from test.get("alert_rule_test", [])


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


# --- promtool --------------------------------------------------------------------------


def test_rules_are_valid() -> None:
    result = subprocess.run(
        [promtool_or_skip(), "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_is_valid() -> None:
    # check config also checks the rule files it names.
    result = subprocess.run(
        [promtool_or_skip(), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no *_test.yml under deploy/prometheus"
    result = subprocess.run(
        [promtool_or_skip(), "test", "rules", *(path.name for path in RULE_TESTS)],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the rules, read as YAML ------------------------------------------------------------


def test_every_alert_is_tested_firing_and_quiet() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    firing = {case["alertname"] for case in rule_test_cases() if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in rule_test_cases() if not case.get("exp_alerts")}
    assert names - firing == set(), "alerts without a test case where they fire"
    assert names - quiet == set(), "alerts without a test case where they stay quiet"
    assert (firing | quiet) - names == set(), "test cases of alerts that do not exist"


def test_every_alert_says_how_bad_what_and_where_to_look() -> None:
    for rule in alert_rules():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{rule['alert']} has no {key}"


def test_alerts_read_only_metrics_the_service_exposes() -> None:
    used = metric_names([rule["expr"] for rule in alert_rules()])
    assert used, "no nbo_ metric found in the rules"
    assert used - exposed_series_names() == set()


# --- the dashboard -----------------------------------------------------------------------


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("x", "y", "w", "h")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_the_chosen_prometheus() -> None:
    board = dashboard()
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in board["panels"]:
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_reads_only_metrics_the_service_exposes() -> None:
    used = metric_names(dashboard_exprs())
    assert DASHBOARD_MUST_READ - used == set(), "panels missing from the dashboard"
    assert used - exposed_series_names() == set()
