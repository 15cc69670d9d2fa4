"""The direct OTLP encoding sends what the SDK's logs API would, at a fraction of the CPU."""

from __future__ import annotations

import json

import pytest
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.sdk._logs import LogRecordLimits
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

from proxy.core.decision import Kind
from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.encoder import LogEncoder, attribute_limits
from proxy.evidence.record import CLOSED_EVENT, connection_closed
from tests.proxy.evidence.decisions import allow, deny_http, dns_query
from tests.proxy.evidence.otel.receivers import Receiver, make_sink
from tests.proxy.evidence.otel.sdk_reference import sdk_emit, sdk_provider


def _sdk_request(records: list[dict[str, object]], version: str) -> ExportLogsServiceRequest:
    """What the SDK's logs API plus its encoder send for these records."""
    exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider = sdk_provider(exporter, version)
    for rec in records:
        sdk_emit(provider, version, rec)
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
    dns_query().to_dict(),  # no event key, no seq
    {**connection_closed(allow(), bytes_out=1, bytes_in=2, duration=0.5).fields,
     "event": CLOSED_EVENT, "seq": 3},
    allow().with_(kind=Kind.TLS, sni="h0.pypi.org\r\n").to_dict(),
    # events with attribute names as keys (journals written before the field table)
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


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_ATTRIBUTE_COUNT_LIMIT": "7", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "9"},
        {"OTEL_ATTRIBUTE_COUNT_LIMIT": "7", "OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT": "3"},
        {"OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT": "0"},
        {"OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT": ""},
    ],
)
def test_attribute_limits_are_read_as_the_sdk_reads_them(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    sdk = LogRecordLimits()
    assert attribute_limits(env) == (
        sdk.max_log_record_attributes,
        sdk.max_log_record_attribute_length,
    )


def test_a_bad_attribute_limit_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT"):
        attribute_limits({"OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT": "-1"})
