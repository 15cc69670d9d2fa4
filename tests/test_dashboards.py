"""The Grafana dashboard and the alert rules: valid, firing when they should, and naming only real metrics.

Metric names are taken from the registry in ``proxy/metrics.py``, so renaming a metric without updating the
dashboard or the alerts fails here instead of silently blanking a panel.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import Emitter
from proxy.evidence.metrics import Metrics
from tests.prometheus_server import PrometheusServer, require_binary

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "agent-egress.json"
ALERTS = ROOT / "dashboards" / "alerts.yaml"
ALERT_TESTS = ROOT / "dashboards" / "alerts_test.yaml"
METRIC = re.compile(r"\begress_[a-z0-9_]+\b")
BUILTIN_METRICS = {"up"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in data["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return [p for p in out if p.get("type") != "row"]


def panel_exprs(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(data) for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def known_names() -> set[str]:
    return Metrics().names()


def concrete(expr: str) -> str:
    """Grafana variables replaced so Prometheus can evaluate the expression."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$instance", ".*")
    )


# -- static checks ---------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    data = dashboard()
    assert data["uid"] == "agent-egress" and data["title"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(data):
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24


def test_dashboard_queries_name_only_defined_metrics() -> None:
    names = known_names()
    queries = [expr for _, expr in panel_exprs(dashboard())]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    covered: set[str] = set()
    for expr in queries:
        used = set(METRIC.findall(expr))
        assert used, f"query names no egress metric: {expr}"
        assert used <= names, f"undefined metric(s) {sorted(used - names)} in: {expr}"
        covered |= used
    families = {f.name for f in Metrics().registry.collect()}
    shown = {n for n in families if any(c.startswith(n) for c in covered)}
    assert families - shown == set(), f"metrics without a panel: {sorted(families - shown)}"


def test_alert_rules_name_only_defined_metrics() -> None:
    names = known_names()
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "EgressDenySpike",
        "EgressJournalErrors",
        "EgressOtlpExportFailing",
        "EgressPolicyReloadFailed",
    }
    for rule in rules:
        used = set(METRIC.findall(rule["expr"]))
        assert used <= names, f"{rule['alert']}: undefined {sorted(used - names)}"
        assert used or "up{" in rule["expr"]


def test_promtool_checks_the_rules() -> None:
    promtool = require_binary("promtool")
    proc = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_alert_unit_tests_pass() -> None:
    """``promtool test rules`` on dashboards/alerts_test.yaml: the deny-spike alert fires on sustained
    6x, 12x and 30x spikes over a non-zero baseline and keeps firing while they last, stays quiet on
    daily and weekly rhythms, and every other alert fires on its failure."""
    promtool = require_binary("promtool")
    proc = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_unit_tests_cover_every_alert_and_each_spike_size() -> None:
    spec = yaml.safe_load(ALERT_TESTS.read_text())
    assert spec["rule_files"] == [ALERTS.name]
    tested = {
        case["alertname"]
        for group in spec["tests"]
        for case in group["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for group in spec["tests"]
        for case in group["alert_rule_test"]
        if not case["exp_alerts"]
    }
    important = {r["alert"] for r in alert_rules()} - {
        "EgressMetricsDown",
        "EgressOtlpExportFailing",
        "EgressOtlpBacklog",
        "EgressAuditUnavailableDenies",
    }
    assert important <= tested
    assert "EgressDenySpike" in quiet
    spiking = {
        series["series"]
        for group in spec["tests"]
        for series in group["input_series"]
        if 'decision="deny"' in series["series"]
    }
    assert {'instance="g6"', 'instance="g12"', 'instance="g30"'} <= {
        re.search(r'instance="\w+"', s).group(0)  # type: ignore[union-attr]
        for s in spiking
    }


def test_info_metric_panels_are_tables_of_labels() -> None:
    """An info metric's value is always 1: its panel must show the labels, as an instant table."""
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            if re.search(r"egress_\w+_info\b", target["expr"]):
                assert panel["type"] == "table", panel["title"]
                assert target.get("format") == "table" and target.get("instant") is True, panel[
                    "title"
                ]


# -- against a real Prometheus ---------------------------------------------------------------------


def test_every_panel_query_runs_on_real_prometheus(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.policy_loaded("v1", ["pypi"])
    host, port = metrics.start("127.0.0.1", 0)
    emitter = Emitter(sinks=[metrics])
    decision = Decision(
        decision=Verdict.DENY,
        reason=Reason.NO_MATCHING_RULE,
        rule=None,
        kind=Kind.CONNECT,
        host="evil.example",
        port=443,
        policy_version="v1",
        mode="enforce",
    )
    try:
        with PrometheusServer([f"{host}:{port}"], tmp_path) as prom:
            for title, expr in panel_exprs(dashboard()):
                try:
                    prom.query(concrete(expr))
                except Exception as exc:  # the API answers 400 with the parse error
                    pytest.fail(f"panel {title!r}: {expr}: {exc}")
            # with traffic the headline panel shows data within a few scrapes
            headline = concrete(panel_exprs(dashboard())[0][1])
            deadline = time.monotonic() + 30
            result: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not result:
                emitter.emit(decision.with_())
                time.sleep(0.5)
                result = prom.query(headline)
            assert result and result[0]["metric"]["decision"] == "deny"
    finally:
        metrics.stop()
