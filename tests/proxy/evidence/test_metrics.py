"""Prometheus metrics: bounded labels, a valid exposition, and a real Prometheus scraping the listener."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import Emitter
from proxy.evidence.metrics import MAX_UNKNOWN_RULES, Metrics
from tests.prometheus_server import PrometheusServer, require_binary


def dec(
    verdict: Verdict = Verdict.ALLOW,
    rule: str | None = "pypi",
    kind: Kind = Kind.CONNECT,
    host: str = "pypi.org",
    client: str = "127.0.0.1",
    reason: Reason = Reason.ALLOWED_BY_RULE,
) -> Decision:
    return Decision(
        decision=verdict,
        reason=reason,
        rule=rule,
        kind=kind,
        host=host,
        port=443,
        policy_version="v1",
        mode="enforce",
        client=client,
        path="/secret/path",
    )


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return value


def test_decisions_are_counted_by_decision_rule_reason_kind() -> None:
    m = Metrics()
    m.policy_loaded("v1", ["pypi", "github"])
    emitter = Emitter(sinks=[m])
    emitter.emit(dec())
    emitter.emit(dec())
    emitter.emit(dec(Verdict.DENY, None, reason=Reason.NO_MATCHING_RULE))
    emitter.emit(dec(Verdict.DENY, None, Kind.DNS, reason=Reason.NO_MATCHING_RULE))
    emitter.emit(dec(Verdict.ALLOW, "github", Kind.DNS))
    labels = {"decision": "allow", "rule": "pypi", "reason": "allowed-by-rule", "kind": "connect"}
    assert sample(m, "egress_decisions_total", **labels) == 2
    assert (
        sample(
            m,
            "egress_decisions_total",
            decision="deny",
            rule="none",
            reason="no-matching-rule",
            kind="dns",
        )
        == 1
    )
    assert sample(m, "egress_dns_queries_total", decision="deny") == 1
    assert sample(m, "egress_dns_queries_total", decision="allow") == 1


def test_labels_stay_bounded_whatever_the_traffic() -> None:
    m = Metrics()
    m.policy_loaded("v1", ["pypi"])
    for i in range(500):
        m.record(dec(rule=f"forged-rule-{i}", host=f"x{i}.evil\n.example", client=f"10.0.{i}.1"))
    text = m.exposition().decode()
    assert "evil" not in text and "10.0." not in text and "/secret" not in text
    assert sample(m, "egress_decisions_total", decision="allow", rule="other",
                  reason="allowed-by-rule", kind="connect") == 500  # fmt: skip
    series = [line for line in text.splitlines() if line.startswith("egress_decisions_total{")]
    assert len(series) == 1


def test_rule_labels_are_capped_before_a_policy_is_loaded() -> None:
    m = Metrics()
    for i in range(MAX_UNKNOWN_RULES + 50):
        m.record(dec(rule=f"r{i}"))
    rules = {
        s.labels["rule"]
        for family in m.registry.collect()
        if family.name == "egress_decisions"
        for s in family.samples
        if s.name == "egress_decisions_total"
    }
    assert len(rules) == MAX_UNKNOWN_RULES + 1  # the first ones, then "other"
    assert "other" in rules


def test_gate_facts() -> None:
    m = Metrics()
    m.policy_loaded("aaa", ["a", "b", "c"], mode="report")
    m.policy_loaded("bbb", ["a", "b"])
    m.policy_reload_failed()
    assert sample(m, "egress_policy_info", version="aaa", mode="report") is None
    assert sample(m, "egress_policy_info", version="bbb", mode="enforce") == 1
    assert sample(m, "egress_policy_rules") == 2
    assert sample(m, "egress_policy_reloads_total", result="ok") == 2
    assert sample(m, "egress_policy_reloads_total", result="error") == 1
    m.connection_opened(Kind.CONNECT)
    m.connection_opened(Kind.CONNECT)
    m.connection_closed(Kind.CONNECT, rule="a", bytes_out=100, bytes_in=5000, duration=2.0)
    assert sample(m, "egress_active_connections", kind="connect") == 1
    assert sample(m, "egress_bytes_total", direction="out", rule="a") == 100
    assert sample(m, "egress_bytes_total", direction="in", rule="a") == 5000
    assert sample(m, "egress_connection_duration_seconds_count", kind="connect") == 1
    with m.time_decision(Kind.HTTP):
        pass
    assert sample(m, "egress_decision_latency_seconds_count", kind="http") == 1
    m.set_active_sandboxes(3)
    assert sample(m, "egress_active_sandboxes") == 3


def test_promtool_accepts_the_exposition() -> None:
    promtool = require_binary("promtool")
    m = Metrics()
    m.policy_loaded("v1", ["pypi"])
    m.record(dec())
    m.record(dec(Verdict.DENY, None, Kind.DNS, reason=Reason.NO_MATCHING_RULE))
    m.observe_decision_latency(Kind.CONNECT, 0.0003)
    m.connection_opened()
    m.connection_closed(rule="pypi", bytes_out=1, bytes_in=2, duration=0.5)
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=m.exposition(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_listener_serves_metrics_and_stops() -> None:
    m = Metrics()
    host, port = m.start("127.0.0.1", 0)
    try:
        m.record(dec())
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert "egress_decisions_total{" in body
    finally:
        m.stop()
    try:
        urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2)
    except OSError:
        pass
    else:
        raise AssertionError("the metrics listener still answers after stop()")


def test_real_prometheus_scrapes_the_counters(tmp_path: Path) -> None:
    m = Metrics()
    m.policy_loaded("v1", ["pypi", "github"])
    host, port = m.start("127.0.0.1", 0)
    emitter = Emitter(sinks=[m])
    try:
        for _ in range(3):
            emitter.emit(dec())
        for _ in range(2):
            emitter.emit(dec(Verdict.DENY, None, reason=Reason.NO_MATCHING_RULE))
        emitter.emit(dec(Verdict.DENY, None, Kind.DNS, reason=Reason.NO_MATCHING_RULE))
        with PrometheusServer([f"{host}:{port}"], tmp_path) as prom:
            allow = 'egress_decisions_total{decision="allow",rule="pypi",kind="connect"}'
            assert prom.wait_for_value(allow, 3) == 3
            assert prom.wait_for_value("sum(egress_decisions_total)", 6) == 6
            assert prom.wait_for_value('egress_dns_queries_total{decision="deny"}', 1) == 1
            assert prom.wait_for_value("egress_policy_rules", 2) == 2
            assert prom.value('up{job="agent-egress"}') == 1
    finally:
        m.stop()


def test_sandbox_policies_add_their_rule_names() -> None:
    m = Metrics()
    m.policy_loaded("v1", ["pypi"])
    m.sandbox_policy_loaded("sb-1", ["npm"])
    m.policy_loaded("v2", ["github"])  # a reload of the main policy keeps the sandbox's rules
    assert m.rule_label("npm") == "npm"
    assert m.rule_label("github") == "github"
    assert m.rule_label("pypi") == "other"
    assert "sb-1" not in m.exposition().decode()


def test_request_decisions_have_their_own_bounded_kind() -> None:
    m = Metrics()
    m.policy_loaded("v1", ["github"])
    emitter = Emitter(sinks=[m])
    emitter.emit(dec(Verdict.ALLOW, "github", Kind.REQUEST))
    refused = dec(Verdict.DENY, None, Kind.REQUEST, reason=Reason.REQUEST_NOT_ALLOWED)
    emitter.emit(refused.with_(method="PUT", path="/secret/path", query="token="))
    labels = {"decision": "deny", "rule": "none", "reason": "request-not-allowed"}
    assert sample(m, "egress_decisions_total", **labels, kind="request") == 1.0
    assert sample(m, "egress_decisions_total", decision="allow", rule="github", reason="allowed-by-rule", kind="request") == 1.0  # fmt: skip
    m.observe_decision_latency(Kind.REQUEST, 0.0001)
    assert sample(m, "egress_decision_latency_seconds_count", kind="request") == 1.0
    text = m.exposition().decode()
    assert "/secret/path" not in text and "PUT" not in text and "token" not in text


def test_a_credential_held_for_an_approval_is_counted_once_as_its_answer() -> None:
    """The ``ask`` record of a request carrying a credential is no refusal: the use is counted
    when the answer comes (``used`` when granted), not as ``refused`` first."""
    m = Metrics()
    m.credentials_loaded(["github"])
    ask = dec(Verdict.ASK, rule="ask-api", kind=Kind.REQUEST, reason=Reason.APPROVAL_PENDING)
    ask = ask.with_(credential="github", approval="a1")
    m.record(ask)
    m.record(ask.with_(decision=Verdict.ALLOW, reason=Reason.APPROVAL_GRANTED))
    denied = ask.with_(decision=Verdict.DENY, reason=Reason.APPROVAL_DENIED)
    m.record(ask)
    m.record(denied)
    labels = {"credential": "github"}
    assert sample(m, "egress_credential_uses_total", **labels, outcome="used") == 1
    assert sample(m, "egress_credential_uses_total", **labels, outcome="refused") == 1  # denied
