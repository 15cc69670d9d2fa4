"""The evidence wiring: CLI flags -> journal (write-ahead) + metrics + OTel + base sinks."""

from __future__ import annotations

import argparse
import io
import json
import urllib.request
from pathlib import Path

import pytest

from proxy.core.decision import Kind, Reason, Verdict
from proxy.evidence.emit import JsonLineSink
from proxy.evidence.flags import DEFAULT_FSYNC, add_evidence_arguments
from proxy.evidence.journal.verify import verify
from proxy.evidence.wiring import EvidenceConfig, EvidenceError, build_emitter
from tests.harness import fresh_python
from tests.otlp_receiver import GrpcReceiver, HttpReceiver
from tests.proxy.evidence.decisions import allow

ROOT = Path(__file__).resolve().parents[3]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_evidence_arguments(parser)
    return parser.parse_args(list(argv))


def config(*argv: str, env: dict[str, str] | None = None) -> EvidenceConfig:
    """The config these flags give in an environment with no OTEL_* variables but ``env``, with a
    short export timeout so a test never waits long for a collector."""
    env = {"OTEL_EXPORTER_OTLP_TIMEOUT": "1", **(env or {})}
    return EvidenceConfig.from_args(parse(*argv), env=env)


def test_flags_and_defaults() -> None:
    args = parse()
    assert args.metrics == "127.0.0.1:9464" and not args.no_metrics
    assert args.journal is None and args.journal_fsync == DEFAULT_FSYNC == "interval"
    assert args.otlp_endpoint is None and args.otlp_protocol is None
    assert not args.audit_required
    args = parse(
        "--otlp-endpoint", "http://127.0.0.1:4317", "--otlp-protocol", "grpc",
        "--journal", "/tmp/j", "--journal-fsync", "always", "--journal-max-bytes", "4096",
        "--audit-required", "--metrics", "[::1]:9999", "--no-metrics",
    )  # fmt: skip
    assert (args.otlp_protocol, args.journal_fsync, args.journal_max_bytes) == (
        "grpc",
        "always",
        4096,
    )
    assert args.audit_required and args.no_metrics and args.metrics == "[::1]:9999"
    with pytest.raises(SystemExit):
        parse("--otlp-protocol", "thrift")


def test_bad_combinations_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="--audit-required needs --journal"):
        config("--audit-required", "--no-metrics")
    with pytest.raises(EvidenceError, match="--metrics wants HOST:PORT"):
        config("--metrics", "9464")
    with pytest.raises(EvidenceError, match="--journal-max-bytes"):
        config("--journal", str(tmp_path / "j"), "--journal-max-bytes", "5", "--no-metrics")
    with pytest.raises(EvidenceError, match="--otlp-protocol"):
        config("--otlp-endpoint", "http://127.0.0.1:1", env={"OTEL_EXPORTER_OTLP_PROTOCOL": "x"})
    with pytest.raises(EvidenceError, match="OTEL_EXPORTER_OTLP_LOGS_COMPRESSION"):
        config(
            "--otlp-endpoint",
            "http://127.0.0.1:1",
            env={"OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "brotli"},
        )
    assert not list(tmp_path.iterdir())  # refused before anything was opened


def test_everything_on_end_to_end(tmp_path: Path) -> None:
    journal = tmp_path / "audit.jsonl"
    log = io.StringIO()
    with GrpcReceiver() as rx:
        settings = config(
            "--journal", str(journal), "--audit-required",
            "--otlp-endpoint", rx.endpoint, "--otlp-protocol", "grpc", "--metrics", "127.0.0.1:0",
        )  # fmt: skip
        evidence = build_emitter(settings, [JsonLineSink(stream=log)])
        evidence.start()
        try:
            assert evidence.metrics_address is not None
            d = allow()
            out = evidence.emit(d)
            assert out is d  # recorded, so unchanged
            evidence.connection_opened(Kind.CONNECT)
            evidence.connection_closed(d, bytes_out=10, bytes_in=2000, duration=0.75)
            host, port = evidence.metrics_address
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            assert (
                'egress_decisions_total{decision="allow",kind="connect",reason="allowed-by-rule",'
                'rule="pypi"} 1.0' in body
            )
            assert 'egress_bytes_total{direction="in",rule="pypi"} 2000.0' in body
            assert "egress_journal_writes_total 2.0" in body
            got = rx.wait_for(2, timeout=15)
        finally:
            evidence.close()
            evidence.close()  # idempotent
    assert [r.event_name for r in got] == ["egress.decision", "egress.connection.closed"]
    assert got[0].attributes["egress.decision.id"] == d.id
    assert got[1].attributes["egress.bytes.in"] == 2000
    assert got[1].attributes["egress.connection.duration"] == 0.75
    assert [r.attributes["egress.journal.seq"] for r in got] == [1, 2]
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["event"] for r in records] == ["egress.decision", "egress.connection.closed"]
    assert verify([journal]).ok
    assert json.loads(log.getvalue().splitlines()[0])["id"] == d.id


def test_standard_environment_variables_configure_export(tmp_path: Path) -> None:
    with HttpReceiver() as rx:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        evidence = build_emitter(config("--no-metrics", env=env))
        evidence.start()
        try:
            assert evidence.metrics_address is None
            assert evidence.otel is not None and evidence.journal is None
            evidence.emit(allow())
            got = rx.wait_for(1, timeout=15)
        finally:
            evidence.close()
    assert len(got) == 1 and got[0].resource["service.name"] == "agent-egress"


def test_no_endpoint_means_no_export() -> None:
    evidence = build_emitter(config("--no-metrics"))
    try:
        assert evidence.otel is None
        assert evidence.emit(allow()).allowed
    finally:
        evidence.close()


def test_a_private_gate_nobody_scrapes_builds_no_registry(tmp_path: Path) -> None:
    """``egress run`` without ``--metrics``: no registry (nothing could read it), every fact the gate
    reports is dropped without error, and the journal and the other sinks still take every record."""
    journal = tmp_path / "audit.jsonl"
    log = io.StringIO()
    settings = config("--journal", str(journal), "--audit-required", "--no-metrics")
    evidence = build_emitter(settings, [JsonLineSink(stream=log)], on_demand=True)
    evidence.start()
    try:
        assert evidence.metrics is None
        assert evidence.metrics_address is None
        d = allow()
        assert evidence.emit(d) is d  # journaled, so allowed under --audit-required
        evidence.connection_opened(Kind.CONNECT)
        evidence.active_sandboxes(1)
        evidence.observe_latency(Kind.CONNECT, 0.001)
        evidence.connection_closed(d, bytes_out=10, bytes_in=2000, duration=0.75)
    finally:
        evidence.close()
        evidence.close()
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [r["event"] for r in records] == ["egress.decision", "egress.connection.closed"]
    assert verify([journal]).ok
    assert json.loads(log.getvalue().splitlines()[0])["id"] == d.id


def test_a_private_gate_with_a_metrics_listener_serves_them(tmp_path: Path) -> None:
    evidence = build_emitter(config("--metrics", "127.0.0.1:0"), on_demand=True)
    evidence.start()
    try:
        assert evidence.metrics is not None and evidence.metrics_address is not None
        evidence.emit(allow())
        host, port = evidence.metrics_address
        assert port != 0 and evidence.metrics_url == f"http://{host}:{port}/metrics"
        with urllib.request.urlopen(evidence.metrics_url, timeout=5) as resp:
            body = resp.read().decode()
        assert 'egress_decisions_total{decision="allow"' in body
    finally:
        evidence.close()


def test_the_metrics_url_of_an_ipv6_listener_has_its_brackets() -> None:
    """The URL a run prints for --metrics [::1]:0 must be one a scraper can use."""
    evidence = build_emitter(config("--metrics", "[::1]:0"), on_demand=True)
    assert evidence.metrics_url is None  # not started: nothing to say yet
    try:
        evidence.start()
    except OSError as exc:  # a host without IPv6 loopback
        pytest.skip(f"no ::1 here: {exc}")
    try:
        assert evidence.metrics_address is not None
        assert evidence.metrics_url == f"http://[::1]:{evidence.metrics_address[1]}/metrics"
    finally:
        evidence.close()


def test_a_shared_gate_keeps_its_registry_without_a_listener() -> None:
    """``egress serve --no-metrics`` still counts (its reloads and approvals report there)."""
    evidence = build_emitter(config("--no-metrics"))
    try:
        assert evidence.metrics is not None
    finally:
        evidence.close()


def test_an_unscraped_private_gate_never_imports_prometheus_client(tmp_path: Path) -> None:
    """prometheus-client (with its HTTP and WSGI servers) is ~50 ms of a run's start: a private gate
    with a journal but no ``--metrics`` listener must not load it."""
    code = (
        "import sys, argparse\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from proxy.evidence.flags import add_evidence_arguments\n"
        "from proxy.evidence.wiring import EvidenceConfig, build_emitter\n"
        "p = argparse.ArgumentParser(); add_evidence_arguments(p)\n"
        "args = p.parse_args(['--journal', sys.argv[1], '--no-metrics'])\n"
        "e = build_emitter(EvidenceConfig.from_args(args, env={}), on_demand=True)\n"
        "e.start(); e.close()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client'))\n"
    )
    assert fresh_python(code, str(tmp_path / "audit.jsonl"), str(ROOT)).strip() == "[]"


def test_audit_required_denies_when_the_journal_is_unwritable(tmp_path: Path) -> None:
    directory = tmp_path / "journal-is-a-dir"
    directory.mkdir()
    evidence = build_emitter(
        config("--journal", str(directory), "--audit-required", "--no-metrics")
    )
    try:
        out = evidence.emit(allow())
    finally:
        evidence.close()
    assert out.decision is Verdict.DENY and out.reason is Reason.AUDIT_UNAVAILABLE
    assert (
        evidence.metrics.registry.get_sample_value(
            "egress_journal_errors_total", {"error": "other"}
        )
        == 1
    )


FILE_SIZE_CHILD = """
import argparse, resource, sys
sys.path.insert(0, sys.argv[2])
from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.flags import add_evidence_arguments
from proxy.evidence.wiring import EvidenceConfig, build_emitter

parser = argparse.ArgumentParser()
add_evidence_arguments(parser)
args = parser.parse_args(["--journal", sys.argv[1], "--audit-required", "--no-metrics"])
evidence = build_emitter(EvidenceConfig.from_args(args, env={}))
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
reasons = []
for i in range(20):
    d = Decision(decision=Verdict.ALLOW, reason=Reason.ALLOWED_BY_RULE, rule="r", kind=Kind.CONNECT,
                 host=f"h{i}.example", port=443, policy_version="v", mode="enforce")
    reasons.append(str(evidence.emit(d).reason))
evidence.close()
print(reasons[0], reasons[-1])
"""


def test_gate_survives_the_file_size_limit_and_denies(tmp_path: Path) -> None:
    """RLIMIT_FSIZE's SIGXFSZ must not kill the gate (CPython ignores it at startup, and nothing here
    may undo that): the write fails with EFBIG and --audit-required denies."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_CHILD, str(tmp_path / "audit.jsonl"), str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"killed or failed ({proc.returncode}): {proc.stderr[-2000:]}"
    assert proc.stdout.split() == ["allowed-by-rule", "audit-unavailable"]
