"""What goes on the wire: the same requests, headers and compression as the SDK's own exporters, TLS
verified against the configured CA, and public APIs only."""

from __future__ import annotations

import ast
import gzip
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter as SdkGrpcExporter
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as SdkHttpExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from proxy.evidence.emit import Emitter
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.encoder import LogEncoder
from proxy.evidence.otel.endpoint import resolve_endpoint
from proxy.evidence.otel.settings import ExporterSettings
from proxy.evidence.otel.sink import OtelSink
from proxy.evidence.otel.transport import ExportFailed, make_transport
from proxy.evidence.record import decision_record
from tests.harness import LocalCA
from tests.otlp_receiver import GrpcReceiver, HttpReceiver
from tests.proxy.evidence.decisions import allow, deny_http
from tests.proxy.evidence.otel.receivers import Receiver
from tests.proxy.evidence.otel.sdk_reference import sdk_emit, sdk_provider

ROOT = Path(__file__).resolve().parents[4]
HEADERS = {
    "OTEL_EXPORTER_OTLP_LOGS_HEADERS": "x-tenant=sandbox-fleet,x-token=s%20t",
    "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "gzip",
}


def _receiver(protocol: str, tls: tuple[Path, Path] | None = None) -> Receiver:
    return GrpcReceiver(tls) if protocol == "grpc" else HttpReceiver(tls)


@pytest.fixture(params=["grpc", "http"])
def protocol(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _serving(rx: Receiver) -> Iterator[Receiver]:
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture
def collector(protocol: str) -> Iterator[Receiver]:
    yield from _serving(_receiver(protocol))


def _target(rx: Receiver) -> tuple[str, str]:
    target = resolve_endpoint(rx.endpoint, rx.protocol, env={})
    assert target is not None
    return target


def _without_observed_time(request: ExportLogsServiceRequest) -> bytes:
    copy = ExportLogsServiceRequest()
    copy.CopyFrom(request)
    for rl in copy.resource_logs:
        for sl in rl.scope_logs:
            for rec in sl.log_records:
                rec.observed_time_unix_nano = 0
    return bytes(copy.SerializeToString(deterministic=True))


def test_requests_and_headers_match_the_sdk_exporters(
    collector: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same record sent by the SDK's exporter and by ours arrives as the same request, with the
    headers and compression the standard variables ask for."""
    for key, value in HEADERS.items():
        monkeypatch.setenv(key, value)
    endpoint, protocol = _target(collector)
    record = decision_record(deny_http())
    sdk = (
        SdkGrpcExporter(endpoint=endpoint, timeout=5)
        if protocol == "grpc"
        else SdkHttpExporter(endpoint=endpoint, timeout=5)
    )
    provider = sdk_provider(sdk, "9.9.9")
    sdk_emit(provider, "9.9.9", record)
    provider.shutdown()
    ours = make_transport(endpoint, protocol, ExporterSettings.from_env(), "9.9.9")  # type: ignore[arg-type]
    ours.send(LogEncoder("9.9.9").encode([record]).payload)
    ours.shutdown()
    assert collector.wait_for(2, timeout=15)
    (sdk_headers, sdk_request), (our_headers, our_request) = collector.raw_requests
    assert _without_observed_time(our_request) == _without_observed_time(sdk_request)
    for name in ("x-tenant", "x-token", "content-type"):
        assert our_headers.get(name) == sdk_headers.get(name), name
    assert our_headers["x-token"] == "s t"
    if protocol == "http":
        assert our_headers["content-encoding"] == sdk_headers["content-encoding"] == "gzip"
    assert our_headers["user-agent"].startswith("agent-egress/9.9.9")


@pytest.mark.parametrize("with_journal", [False, True], ids=["memory", "journal"])
def test_standard_exporter_variables_apply_in_the_gate_and_the_export_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_journal: bool
) -> None:
    for key, value in HEADERS.items():
        monkeypatch.setenv(key, value)
    metrics = Metrics()
    journal = Journal(tmp_path / "audit.jsonl", metrics=metrics) if with_journal else None
    with HttpReceiver() as rx:
        sink = OtelSink(_target(rx), timeout=1.0, version="1", metrics=metrics, journal=journal)  # type: ignore[arg-type]
        emitter = Emitter(sinks=[sink], write_ahead=[journal] if journal else [])
        d = emitter.emit(allow())
        try:
            assert sink.flush(15)
        finally:
            sink.close()
            if journal is not None:
                journal.close()
        ((headers, request),) = rx.raw_requests
    assert headers["x-tenant"] == "sandbox-fleet"
    assert headers["content-encoding"] == "gzip"
    (rec,) = request.resource_logs[0].scope_logs[0].log_records
    assert {kv.key: kv.value.string_value for kv in rec.attributes}["egress.decision.id"] == d.id
    assert request.resource_logs[0].scope_logs[0].scope.name == "agent-egress"


@pytest.fixture
def tls_collector(protocol: str, test_ca: LocalCA) -> Iterator[Receiver]:
    yield from _serving(_receiver(protocol, (test_ca.cert_path, test_ca.key_path)))


def test_tls_collector_is_verified_with_the_configured_ca(
    tls_collector: Receiver, test_ca: LocalCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configured CA is the one used, whatever a library's own variable says."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent/bundle.pem")
    endpoint, protocol = _target(tls_collector)
    assert endpoint.startswith("https://")
    payload = LogEncoder("1").encode([decision_record(allow())]).payload
    trusting = ExporterSettings.from_env({"OTEL_EXPORTER_OTLP_CERTIFICATE": str(test_ca.ca_path)})
    transport = make_transport(endpoint, protocol, trusting, "1")  # type: ignore[arg-type]
    transport.send(payload)
    transport.shutdown()
    assert tls_collector.count == 1


def test_an_untrusted_collector_gets_nothing(tls_collector: Receiver) -> None:
    """Without the CA that signed the collector's certificate, nothing is sent: the batch stays
    queued (ExportFailed is retried), it never goes to an unverified peer."""
    endpoint, protocol = _target(tls_collector)
    payload = LogEncoder("1").encode([decision_record(allow())]).payload
    transport = make_transport(endpoint, protocol, ExporterSettings(timeout=2.0), "1")  # type: ignore[arg-type]
    with pytest.raises(ExportFailed):
        transport.send(payload)
    transport.shutdown()
    time.sleep(0.2)
    assert tls_collector.count == 0


def test_a_refusing_collector_is_a_failure_not_a_delivery(collector: Receiver) -> None:
    """An HTTP error status or gRPC error is ExportFailed, so the retry queue keeps the batch."""
    endpoint, protocol = _target(collector)
    wrong = endpoint.replace("/v1/logs", "/v1/nothing") if protocol == "http" else endpoint
    transport = make_transport(wrong, protocol, ExporterSettings(timeout=2.0), "1")  # type: ignore[arg-type]
    collector.stop()
    try:
        with pytest.raises(ExportFailed):
            transport.send(LogEncoder("1").encode([decision_record(allow())]).payload)
    finally:
        transport.shutdown()


def test_the_gate_imports_no_private_opentelemetry_module() -> None:
    """Private SDK modules change between minor releases; the gate uses public APIs only."""
    offenders = []
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "opentelemetry" and (
                    any(p.startswith("_") for p in parts) or parts[1:2] == ["exporter"]
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert offenders == []


def test_gzip_bodies_decompress_to_the_request() -> None:
    data = LogEncoder("1").encode([decision_record(allow())]).payload
    assert gzip.decompress(gzip.compress(data, compresslevel=6)) == data
