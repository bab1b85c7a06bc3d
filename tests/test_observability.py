"""deploy/observability/ stays true to the metrics peers really serve: the alert
rules pass promtool (and their own unit tests), and the dashboard is a
well-formed Grafana dashboard whose every query names a real metric."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from raftmesh.mesh.metrics import Metrics

DIR = Path(__file__).resolve().parent.parent / "deploy" / "observability"
PROMQL_FUNCTIONS = {
    "sum",
    "max",
    "min",
    "rate",
    "increase",
    "histogram_quantile",
    "absent",
    "by",
    "and",
    "clamp_min",
    "changes",
    "le",
    "or",
}

LABELS = {"instance", "job", "limit", "status", "tenant"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run scripts/test.sh, or apt-get install -y prometheus")
    return path


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def served_metric_names() -> set[str]:
    """Every series name a peer's registry can expose, suffixes included
    (labelled metrics show no series until a label is set, so read families)."""
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in SUFFIXES[family.type]
    }


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", (DIR / "alerts.yml").read_text(), re.MULTILINE)


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", str(DIR / "alerts.yml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(alert_names())} rules found" in check.stdout
    tested = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=DIR
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alert_rules_cover_what_the_issue_asks_for() -> None:
    text = (DIR / "alerts.yml").read_text()
    for alert in (
        "RaftmeshNoLeader",
        "RaftmeshPeerDown",
        "RaftmeshQueuedOverSLA",
        "RaftmeshLeaseChurn",
        "RaftmeshStorageSlow",
    ):
        assert f"alert: {alert}" in text


def _metric_names(expr: str) -> set[str]:
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", without_ranges))
    return {w for w in words if w not in PROMQL_FUNCTIONS and w not in LABELS}


def test_dashboard_is_structurally_valid_and_uses_only_served_metrics() -> None:
    dash = json.loads((DIR / "grafana" / "dashboards" / "raftmesh.json").read_text())
    assert isinstance(dash["uid"], str) and dash["uid"]
    assert isinstance(dash["title"], str) and dash["title"]
    assert isinstance(dash["schemaVersion"], int)
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    served = served_metric_names() | {"up"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used: set[str] = set()
    for panel in dash["panels"]:
        assert panel["type"] in {"row", "stat", "timeseries"}, panel["title"]
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys()
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            unknown = names - served
            assert not unknown, f"panel {panel['title']!r} queries unknown metrics {unknown}"
            used |= names
    for needed in (
        "raftmesh_assignment_latency_seconds_bucket",
        "raftmesh_failovers_total",
        "raftmesh_failover_duration_seconds_bucket",
        "raftmesh_raft_commit_seconds_bucket",
        "raftmesh_raft_apply_lag_entries",
        "raftmesh_runs",
        "raftmesh_storage_pool_connections_in_use",
    ):
        assert needed in used, f"the dashboard does not show {needed}"


def test_alert_rules_use_only_served_metrics() -> None:
    served = served_metric_names() | {"up"}
    exprs = re.findall(r"^\s+expr: (.+)$", (DIR / "alerts.yml").read_text(), re.MULTILINE)
    assert len(exprs) == len(alert_names())
    for expr in exprs:
        unknown = _metric_names(expr) - served
        assert not unknown, f"{expr}: unknown metrics {unknown}"
