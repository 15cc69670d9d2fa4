"""OTel decision events through the SDK's real OTLP exporters to real receivers on loopback."""

from __future__ import annotations

import gzip
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import Emitter
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.export import (
    CLOSED_EVENT,
    LogEncoder,
    OtelSink,
    decision_attributes,
    event_attributes,
    make_resource,
    resolve_endpoint,
    scrub_host,
    scrub_text,
    scrub_url,
)
from tests.otlp_receiver import GrpcReceiver, HttpReceiver

Receiver = GrpcReceiver | HttpReceiver


def allow(i: int = 0) -> Decision:
    return Decision(
        decision=Verdict.ALLOW,
        reason=Reason.ALLOWED_BY_RULE,
        rule="pypi",
        kind=Kind.CONNECT,
        host=f"h{i}.pypi.org",
        port=443,
        policy_version="abc123",
        mode="enforce",
        client="127.0.0.1",
        sandbox_id="sb-1",
        address="203.0.113.7",
    )


def deny_http() -> Decision:
    return Decision(
        decision=Verdict.DENY,
        reason=Reason.NO_MATCHING_RULE,
        rule=None,
        kind=Kind.HTTP,
        host="user:hunter2@evil.example",
        port=80,
        policy_version="abc123",
        mode="enforce",
        method="POST",
        path="/upload?token=s3cr3t&name=x#frag",
        client="127.0.0.1",
    )


def dns_query() -> Decision:
    return Decision(
        decision=Verdict.DENY,
        reason=Reason.NO_MATCHING_RULE,
        rule=None,
        kind=Kind.DNS,
        host="exfil-data.attacker.example",
        port=None,
        policy_version="abc123",
        mode="enforce",
        qtype="TXT",
    )


# -- pure scrubbing and configuration ----------------------------------------------------------------


def test_scrub_escapes_control_characters_and_caps_length() -> None:
    assert scrub_text("a\nb\r\x00c\x7f\x85") == "a\\x0ab\\x0d\\x00c\\x7f\\x85"
    capped = scrub_text("x" * 1000)
    assert len(capped) == 256 and capped.endswith("...")


def test_scrub_url_drops_userinfo_query_values_and_fragment() -> None:
    assert scrub_url("/a/b?token=s3cr3t&q=1#frag") == ("/a/b", "token=&q=")
    path, query = scrub_url("http://user:pw@host.example:8080/x?k=v")
    assert path == "http://host.example:8080/x" and query == "k="
    assert scrub_url("/plain") == ("/plain", None)
    assert scrub_host("user:pw@h.example") == "h.example"


def test_decision_attribute_names() -> None:
    attrs = decision_attributes(deny_http().to_dict())
    assert attrs["server.address"] == "evil.example"
    assert attrs["server.port"] == 80
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/upload"
    assert attrs["url.query"] == "token=&name="
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["egress.decision"] == "deny"
    assert attrs["egress.reason"] == "no-matching-rule"
    assert attrs["egress.policy.version"] == "abc123"
    assert attrs["egress.mode"] == "enforce"
    assert attrs["network.protocol.name"] == "http"
    assert "egress.rule" not in attrs
    assert "s3cr3t" not in repr(attrs) and "hunter2" not in repr(attrs)
    a = decision_attributes(allow().to_dict())
    assert a["egress.rule"] == "pypi"
    assert a["egress.sandbox.id"] == "sb-1"
    assert a["egress.resolved_address"] == "203.0.113.7"
    d = decision_attributes(dns_query().to_dict())
    assert d["dns.question.name"] == "exfil-data.attacker.example"
    assert d["network.protocol.name"] == "dns"
    sni = decision_attributes(allow().with_(kind=Kind.TLS, sni="h0.pypi.org").to_dict())
    assert sni["tls.client.server_name"] == "h0.pypi.org"


def test_endpoint_resolution_from_flags_and_environment() -> None:
    assert resolve_endpoint(None, None, env={}) is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert resolve_endpoint(None, None, env=env) == ("http://c:4317", "grpc")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
    assert resolve_endpoint(None, None, env=env) == ("http://c:4318/v1/logs", "http")
    env = {
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://c:9/custom",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "x",
    }
    assert resolve_endpoint(None, "http", env=env) == ("http://c:9/custom", "http")
    # flags win over the environment
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert resolve_endpoint("http://d:4318", "http", env=env) == ("http://d:4318/v1/logs", "http")
    assert resolve_endpoint("http://d:4318/v1/logs", None, env={}) == (
        "http://d:4318/v1/logs",
        "http",
    )
    with pytest.raises(ValueError, match="--otlp-protocol"):
        resolve_endpoint("http://d:1", "thrift", env={})


# -- against real receivers --------------------------------------------------------------------------


@pytest.fixture(params=["grpc", "http"])
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    rx: Receiver = GrpcReceiver() if request.param == "grpc" else HttpReceiver()
    rx.start()
    try:
        yield rx
    finally:
        rx.stop()


def make_sink(rx: Receiver, metrics: Metrics, **kw: object) -> OtelSink:
    target = resolve_endpoint(rx.endpoint, rx.protocol, env={})
    assert target is not None
    return OtelSink(
        target,
        timeout=1.0,
        version="9.9.9",
        metrics=metrics,
        flush_interval=0.05,
        max_backoff=0.3,
        **kw,  # type: ignore[arg-type]
    )


def test_allow_deny_and_dns_events_arrive(receiver: Receiver) -> None:
    metrics = Metrics()
    sink = make_sink(receiver, metrics)
    emitter = Emitter(sinks=[sink])
    sent = [allow(), deny_http(), dns_query()]
    for d in sent:
        emitter.emit(d)
    emitter.event(
        CLOSED_EVENT,
        {"egress.decision.id": sent[0].id, "egress.bytes.out": 120, "egress.bytes.in": 4096,
         "egress.duration": 1.25, "server.address": "h0.pypi.org"},
    )  # fmt: skip
    try:
        got = receiver.wait_for(4, timeout=15)
    finally:
        sink.close()
    assert len(got) == 4
    decisions = [r for r in got if r.event_name == "egress.decision"]
    assert [r.attributes["egress.decision.id"] for r in decisions] == [d.id for d in sent]
    for r in got:
        assert r.resource["service.name"] == "agent-egress"
        assert r.resource["service.version"] == "9.9.9"
        assert r.resource["host.name"]
    got_allow, got_http, got_dns = decisions
    assert got_allow.attributes["egress.decision"] == "allow"
    assert got_allow.attributes["server.port"] == 443
    assert got_allow.time_unix_nano == int(sent[0].ts * 1e9)
    assert got_http.attributes["url.query"] == "token=&name="
    assert got_http.attributes["server.address"] == "evil.example"
    assert got_dns.attributes["dns.question.name"] == "exfil-data.attacker.example"
    everything = repr([r.attributes for r in got]) + repr([r.body for r in got])
    assert "s3cr3t" not in everything and "hunter2" not in everything
    (closed,) = [r for r in got if r.event_name == CLOSED_EVENT]
    assert closed.attributes["egress.bytes.in"] == 4096
    assert closed.attributes["egress.duration"] == 1.25
    assert metrics.otlp_exported._value.get() == 4


def _wait(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("with_journal", [False, True], ids=["memory", "journal"])
def test_collector_outage_loses_nothing_and_duplicates_nothing(
    receiver: Receiver, tmp_path: Path, with_journal: bool
) -> None:
    metrics = Metrics()
    journal = (
        Journal(tmp_path / "audit.jsonl", metrics=metrics, max_bytes=4096) if with_journal else None
    )
    sink = make_sink(receiver, metrics, journal=journal)
    emitter = Emitter(sinks=[sink], write_ahead=[journal] if journal else [])
    before, during = 5, 40
    ids: list[str] = []
    try:
        for i in range(before):
            ids.append(emitter.emit(allow(i)).id)
        assert len(receiver.wait_for(before, timeout=15)) == before
        assert sink.flush(5)
        receiver.stop()
        for i in range(during):
            ids.append(emitter.emit(allow(100 + i)).id)
        # the exporter really saw the collector gone (and keeps the events)
        assert _wait(lambda: metrics.otlp_export_failures._value.get() >= 1, 15)
        assert metrics.otlp_queue_depth._value.get() > 0
        receiver.start()  # same port
        got = receiver.wait_for(before + during, timeout=20)
        assert sink.flush(10)
        time.sleep(0.3)  # a duplicate would have arrived by now
        got = receiver.records
    finally:
        sink.close()
        if journal is not None:
            journal.close()
    received_ids = [r.attributes["egress.decision.id"] for r in got]
    assert len(received_ids) == before + during
    assert len(set(received_ids)) == before + during
    assert set(received_ids) == set(ids)
    assert metrics.otlp_retries._value.get() >= 1
    assert metrics.otlp_dropped.labels(reason="queue_full")._value.get() == 0
    assert metrics.otlp_queue_depth._value.get() == 0
    if with_journal:
        assert {r.attributes["egress.journal.seq"] for r in got} == set(range(1, 46))


def test_full_memory_queue_drops_are_counted_not_silent(receiver: Receiver) -> None:
    metrics = Metrics()
    receiver.stop()
    sink = make_sink(receiver, metrics, max_queue=5, batch_size=5)
    ids = [allow(i) for i in range(30)]
    try:
        for d in ids:
            sink.record(d)
        dropped = metrics.otlp_dropped.labels(reason="queue_full")._value.get()
        assert dropped >= 20
        receiver.start()
        assert sink.flush(15)
        got = receiver.records
    finally:
        sink.close()
    assert len(got) + dropped == len(ids)
    assert len({r.attributes["egress.decision.id"] for r in got}) == len(got)


def test_decisions_the_journal_could_not_write_are_still_exported(
    receiver: Receiver, tmp_path: Path
) -> None:
    metrics = Metrics()
    broken = tmp_path / "dir"
    broken.mkdir()
    journal = Journal(broken, metrics=metrics)  # a directory: every write fails
    sink = make_sink(receiver, metrics, journal=journal)
    emitter = Emitter(sinks=[sink], write_ahead=[journal], audit_required=True)
    out = emitter.emit(allow())
    try:
        got = receiver.wait_for(1, timeout=15)
    finally:
        sink.close()
        journal.close()
    assert out.reason is Reason.AUDIT_UNAVAILABLE
    assert [r.attributes["egress.reason"] for r in got] == ["audit-unavailable"]


def test_events_kept_in_the_journal_are_sent_after_a_restart(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The collector is down until the gate stops; the next gate process sends the backlog from the
    journal (and only the backlog), exactly once."""
    path = tmp_path / "audit.jsonl"
    history = Journal(path, max_bytes=4096)
    for i in range(7):  # written before OTel was ever configured: not replayed
        history.record(allow(1000 + i))
    history.close()

    metrics = Metrics()
    journal = Journal(path, max_bytes=4096, metrics=metrics)
    sink = make_sink(receiver, metrics, journal=journal)
    emitter = Emitter(sinks=[sink], write_ahead=[journal])
    first = [emitter.emit(allow(i)).id for i in range(3)]
    assert len(receiver.wait_for(3, timeout=15)) == 3
    assert sink.flush(5)
    receiver.stop()
    kept = [emitter.emit(allow(100 + i)).id for i in range(30)]
    sink.close(timeout=1.0)  # collector still down: these stay in the journal
    journal.close()
    assert metrics.otlp_dropped.labels(reason="shutdown")._value.get() == 0

    receiver.start()
    metrics = Metrics()
    journal = Journal(path, max_bytes=4096, metrics=metrics)
    sink = make_sink(receiver, metrics, journal=journal)
    emitter = Emitter(sinks=[sink], write_ahead=[journal])
    later = [emitter.emit(allow(200 + i)).id for i in range(4)]
    try:
        assert sink.flush(15)
        time.sleep(0.3)
        got = receiver.records
    finally:
        sink.close()
        journal.close()
    received = [r.attributes["egress.decision.id"] for r in got]
    assert len(received) == len(set(received)) == 3 + 30 + 4
    assert set(received) == {*first, *kept, *later}
    assert {r.attributes["egress.journal.seq"] for r in got} == set(range(8, 8 + 37))


def test_a_killed_export_process_is_restarted_and_resumes(
    receiver: Receiver, tmp_path: Path
) -> None:
    metrics = Metrics()
    journal = Journal(tmp_path / "audit.jsonl", metrics=metrics)
    sink = make_sink(receiver, metrics, journal=journal)
    emitter = Emitter(sinks=[sink], write_ahead=[journal])
    try:
        ids = [emitter.emit(allow(i)).id for i in range(5)]
        assert sink.flush(15)
        assert sink.process is not None and sink.process._proc is not None
        victim = sink.process._proc
        os.kill(victim.pid, signal.SIGKILL)  # a process this test's sink started
        victim.wait(10)
        ids += [emitter.emit(allow(100 + i)).id for i in range(10)]
        assert sink.flush(20)
        time.sleep(0.3)
        got = receiver.records
        assert sink.process._proc is not victim
    finally:
        sink.close()
        journal.close()
    received = [r.attributes["egress.decision.id"] for r in got]
    assert len(received) == len(set(received)) == 15
    assert set(received) == set(ids)


def test_the_export_process_is_gone_after_close(receiver: Receiver, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "audit.jsonl")
    sink = make_sink(receiver, Metrics(), journal=journal)
    assert sink.process is not None and sink.process._proc is not None
    proc = sink.process._proc
    sink.close()
    journal.close()
    assert proc.poll() is not None


# -- the direct OTLP encoding ------------------------------------------------------------------------


def _sdk_request(records: list[dict[str, object]], version: str) -> ExportLogsServiceRequest:
    """What the SDK's logs API plus ``encode_logs`` send for these records (the pre-LogEncoder path)."""
    exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider = LoggerProvider(resource=make_resource(version), shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("agent-egress", version)
    for rec in records:
        if rec.get("event", "egress.decision") == "egress.decision":
            attrs = decision_attributes(rec)
            allowed = str(rec.get("decision")) == "allow"
            logger.emit(
                timestamp=int(float(rec["ts"]) * 1e9),  # type: ignore[arg-type]
                severity_number=SeverityNumber.INFO if allowed else SeverityNumber.WARN,
                severity_text="INFO" if allowed else "WARN",
                body=(
                    f"{attrs.get('egress.decision', '?')} {attrs.get('egress.kind', '?')} "
                    f"{attrs.get('server.address', '?')}:{attrs.get('server.port', '-')} "
                    f"({attrs.get('egress.reason', '?')})"
                ),
                attributes=attrs,
                event_name="egress.decision",
            )
        else:
            logger.emit(
                timestamp=int(float(rec["ts"]) * 1e9),  # type: ignore[arg-type]
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
                attributes=event_attributes(rec),
                event_name=scrub_text(str(rec["event"]), 64),
            )
    request = encode_logs(exporter.get_finished_logs())
    provider.shutdown()
    return request


def _without_observed_time(request: ExportLogsServiceRequest) -> bytes:
    for rl in request.resource_logs:
        for sl in rl.scope_logs:
            for rec in sl.log_records:
                assert rec.observed_time_unix_nano > 0
                rec.observed_time_unix_nano = 0
    return bytes(request.SerializeToString(deterministic=True))


ENCODING_CASES: list[dict[str, object]] = [
    {"event": "egress.decision", **allow().to_dict(), "seq": 1, "prev": "0" * 64, "hash": "a" * 64},
    {"event": "egress.decision", **deny_http().to_dict(), "seq": 2},
    dns_query().to_dict(),  # in-process: no event key, no seq, enum values
    allow().with_(kind=Kind.TLS, sni="h0.pypi.org\r\n").to_dict(),
    {"ts": 1.5, "event": CLOSED_EVENT, "seq": 5, "egress.bytes.in": 4096, "egress.ok": True,
     "egress.connection.duration": 0.25, "server.address": "u:pw@h.example", "": "empty key",
     "long": "x" * 300, "k\x00": "v\x01"},
    {"ts": 2.5, "event": "odd\nname", **{f"a{i}": i for i in range(200)}},  # past the count limit
    {"ts": 3.5, "event": CLOSED_EVENT, "too.big": 2**70, "fine": 1},  # an int64 overflow
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Log record attributes were dropped")
@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT": "10", "OTEL_RESOURCE_ATTRIBUTES": "a=b"},
        {"OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT": "5"},
        {"OTEL_ATTRIBUTE_COUNT_LIMIT": "0"},
    ],
    ids=["defaults", "length-limit", "count-limit", "no-attributes"],
)
def test_direct_encoding_sends_what_the_sdk_logs_api_would(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    records = [json.loads(json.dumps(r, default=str)) for r in ENCODING_CASES[:2]]
    records += ENCODING_CASES[2:]
    encoded = LogEncoder("9.9.9").encode(records)
    assert (encoded.records, encoded.failed) == (len(records), 0)
    expected = _sdk_request(records, "9.9.9")
    assert _without_observed_time(encoded.request) == _without_observed_time(expected)


def test_a_record_that_cannot_be_encoded_is_dropped_and_counted(receiver: Receiver) -> None:
    """A negative timestamp does not fit OTLP's unsigned field: that record is counted as an encode
    drop, and the rest of its batch is still delivered (not retried forever)."""
    encoded = LogEncoder("1").encode([allow(1).to_dict(), allow(2).with_(ts=-5.0).to_dict()])
    assert (encoded.records, encoded.failed) == (1, 1)
    metrics = Metrics()
    sink = make_sink(receiver, metrics)
    good = [allow(i) for i in range(3)]
    try:
        sink.record(good[0])
        sink.record(allow(99).with_(ts=-5.0))
        for d in good[1:]:
            sink.record(d)
        assert sink.flush(15)
        got = receiver.records
    finally:
        sink.close()
    assert [r.attributes["egress.decision.id"] for r in got] == [d.id for d in good]
    assert metrics.otlp_dropped.labels(reason="encode")._value.get() == 1
    assert metrics.otlp_exported._value.get() == 3
    assert metrics.otlp_export_failures._value.get() == 0


class _CapturingHandler(BaseHTTPRequestHandler):
    seen: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
        reply = ExportLogsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("with_journal", [False, True], ids=["memory", "journal"])
def test_standard_exporter_variables_still_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_journal: bool
) -> None:
    """Headers and compression come from OTEL_EXPORTER_OTLP_LOGS_* through the SDK's own transport,
    in the gate process and in the export process alike."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "x-tenant=sandbox-fleet")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "gzip")
    handler: type[_CapturingHandler] = type("Handler", (_CapturingHandler,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    metrics = Metrics()
    journal = Journal(tmp_path / "audit.jsonl", metrics=metrics) if with_journal else None
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}/v1/logs"
        sink = OtelSink(
            (endpoint, "http"), timeout=1.0, version="1", metrics=metrics, journal=journal
        )
        emitter = Emitter(sinks=[sink], write_ahead=[journal] if journal else [])
        d = emitter.emit(allow())
        try:
            assert sink.flush(15)
        finally:
            sink.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        if journal is not None:
            journal.close()
    ((headers, body),) = handler.seen
    assert headers["x-tenant"] == "sandbox-fleet"
    assert headers["content-encoding"] == "gzip"
    request = ExportLogsServiceRequest.FromString(gzip.decompress(body))
    (rec,) = request.resource_logs[0].scope_logs[0].log_records
    assert {kv.key: kv.value.string_value for kv in rec.attributes}["egress.decision.id"] == d.id
    assert request.resource_logs[0].scope_logs[0].scope.name == "agent-egress"


def test_otel_sdk_disabled_turns_export_off() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}
    assert resolve_endpoint(None, None, env=env) is None
    assert resolve_endpoint("http://d:4318", "http", env=env) is None
    env["OTEL_SDK_DISABLED"] = "false"
    assert resolve_endpoint(None, None, env=env) == ("http://c:4317", "grpc")


def test_request_decisions_carry_method_path_and_the_recorded_query() -> None:
    from proxy.evidence.otel.export import decision_attributes

    refused = Decision(
        decision=Verdict.DENY,
        reason=Reason.REQUEST_NOT_ALLOWED,
        rule=None,
        kind=Kind.REQUEST,
        host="github.com",
        port=443,
        policy_version="abc123",
        mode="enforce",
        method="GET",
        path="/o/r.git/info/refs",
        query="service=\nx",
    )
    attributes = decision_attributes(refused.to_dict())
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/o/r.git/info/refs"
    assert attributes["url.query"] == "service=\\x0ax"
    assert attributes["egress.kind"] == "request"
    assert attributes["network.protocol.name"] == "http"
