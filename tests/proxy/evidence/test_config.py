"""The evidence config: every flag checked once, errors naming the flag, nothing heavy imported."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from proxy.evidence.config import EvidenceConfig, EvidenceError, parse_hostport
from proxy.evidence.flags import add_evidence_arguments
from tests.harness import fresh_python

ROOT = Path(__file__).resolve().parents[3]


def from_flags(*argv: str, env: dict[str, str] | None = None) -> EvidenceConfig:
    parser = argparse.ArgumentParser()
    add_evidence_arguments(parser)
    return EvidenceConfig.from_args(parser.parse_args(list(argv)), env=env or {})


def test_defaults_and_every_flag() -> None:
    assert from_flags() == EvidenceConfig(metrics_listen=("127.0.0.1", 9464))
    config = from_flags(
        "--journal", "/var/lib/egress/audit.jsonl", "--journal-fsync", "always",
        "--journal-max-bytes", "4096", "--audit-required", "--metrics", "[::1]:0",
        "--otlp-endpoint", "http://collector:4318",
    )  # fmt: skip
    assert config.journal == Path("/var/lib/egress/audit.jsonl")
    assert (config.journal_fsync, config.journal_max_bytes) == ("always", 4096)
    assert config.audit_required
    assert config.metrics_listen == ("::1", 0)
    assert config.otlp == ("http://collector:4318/v1/logs", "http")
    assert from_flags("--no-metrics").metrics_listen is None


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--audit-required"], {}, "--audit-required needs --journal FILE"),
        (["--journal", "j", "--journal-max-bytes", "1023"], {}, "--journal-max-bytes must be at least 1024"),
        (["--metrics", "9464"], {}, "--metrics wants HOST:PORT"),
        (["--metrics", "h:99999"], {}, "--metrics wants HOST:PORT"),
        (["--otlp-endpoint", "http://c:1", "--otlp-protocol", "http"],
         {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        (["--otlp-endpoint", "http://c:1"], {"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}, "--otlp-protocol"),
    ],
)  # fmt: skip
def test_bad_values_name_their_flag(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(EvidenceError, match=message):
        from_flags(*argv, env=env)


def test_a_config_built_directly_is_checked_too() -> None:
    with pytest.raises(EvidenceError, match="--journal-fsync"):
        EvidenceConfig(journal_fsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="--audit-required"):
        EvidenceConfig(audit_required=True)


def test_listen_addresses() -> None:
    assert parse_hostport("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_hostport("[::1]:9464") == ("::1", 9464)
    with pytest.raises(EvidenceError, match="--metrics"):
        parse_hostport(":9464")


def test_the_flags_and_the_config_load_no_exporter() -> None:
    """`egress --help` and `egress run -- true` build the parser and config: keep them light."""
    code = (
        "import sys, argparse; sys.path.insert(0, sys.argv[1]);"
        "from proxy.evidence.config import EvidenceConfig;"
        "from proxy.evidence.flags import add_evidence_arguments;"
        "p = argparse.ArgumentParser(); add_evidence_arguments(p);"
        "EvidenceConfig.from_args(p.parse_args([]), env={});"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('opentelemetry', 'grpc', 'google', 'prometheus_client', 'requests')];"
        "print(heavy)"
    )
    assert fresh_python(code, str(ROOT)).strip() == "[]"
