"""Decisions and events through the sink to real OTLP receivers: nothing lost, nothing twice."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from proxy.core.decision import Reason
from proxy.evidence.emit import Emitter
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.sink import OtelSink
from proxy.evidence.record import CLOSED_EVENT, connection_closed
from tests.harness import wait_until
from tests.otlp_receiver import GrpcReceiver, Received
from tests.proxy.evidence.decisions import allow, deny_http, dns_query
from tests.proxy.evidence.otel.receivers import Receiver, make_sink


def delivered(receiver: Receiver, sink: OtelSink, count: int, timeout: float) -> list[Received]:
    """What the collector has once ``count`` records arrived and the sink flushed, and a moment
    later: a duplicate would have arrived by then."""
    receiver.wait_for(count, timeout=timeout)
    assert sink.flush(10)
    time.sleep(0.3)
    return receiver.records


def test_allow_deny_and_dns_events_arrive(receiver: Receiver) -> None:
    metrics = Metrics()
    sink = make_sink(receiver, metrics)
    emitter = Emitter(sinks=[sink])
    sent = [allow(), deny_http(), dns_query()]
    for d in sent:
        emitter.emit(d)
    emitter.event(*connection_closed(sent[0], bytes_out=120, bytes_in=4096, duration=1.25))
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
    assert closed.attributes["egress.decision.id"] == sent[0].id
    assert closed.attributes["server.address"] == "h0.pypi.org"
    assert closed.attributes["egress.bytes.out"] == 120
    assert closed.attributes["egress.bytes.in"] == 4096
    assert closed.attributes["egress.connection.duration"] == 1.25
    assert metrics.otlp_exported._value.get() == 4


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
        assert wait_until(lambda: metrics.otlp_export_failures._value.get() >= 1, 15)
        assert metrics.otlp_queue_depth._value.get() > 0
        receiver.start()  # same port
        got = delivered(receiver, sink, before + during, timeout=20)
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


@pytest.mark.parametrize("with_journal", [False, True], ids=["memory", "journal"])
def test_a_batch_larger_than_the_collectors_message_limit_is_sent_in_parts(
    tmp_path: Path, with_journal: bool
) -> None:
    """A collector refuses a request over its receive limit (4 MiB by default for gRPC) on every
    retry: a full batch of large records (a process's argv is the sandbox's to choose) must still
    arrive, and so must every record after it."""
    receiver = GrpcReceiver()  # grpc's own 4 MiB receive limit, as a collector's default
    receiver.start()
    metrics = Metrics()
    journal = Journal(tmp_path / "audit.jsonl", metrics=metrics) if with_journal else None
    sink = make_sink(receiver, metrics, journal=journal)
    emitter = Emitter(sinks=[sink], write_ahead=[journal] if journal else [])
    argv = tuple("a" * 300 for _ in range(64))  # ~16 KiB exported: 512 of them, ~8 MiB
    ids: list[str] = []
    try:
        receiver.stop()  # the queue fills to full batches while the collector is away
        for i in range(600):
            ids.append(emitter.emit(allow(i, pid=7, exe="/usr/bin/tool", argv=argv)).id)
        assert wait_until(lambda: metrics.otlp_export_failures._value.get() >= 1, 15)
        receiver.start()
        ids.append(emitter.emit(allow(1000)).id)  # a small record behind the large ones
        got = delivered(receiver, sink, len(ids), timeout=30)
    finally:
        sink.close()
        if journal is not None:
            journal.close()
        receiver.stop()
    received_ids = [r.attributes["egress.decision.id"] for r in got]
    assert received_ids == ids  # every record, once, in order
    assert sum(len(r.attributes.get("process.command_args", ())) == 64 for r in got) == 600
    for reason in ("queue_full", "encode", "shutdown"):
        assert metrics.otlp_dropped.labels(reason=reason)._value.get() == 0


def test_records_the_collector_rejects_are_counted_dropped_not_exported(
    receiver: Receiver,
) -> None:
    """A collector may take a request and answer that it rejected some of its records (OTLP
    partial success): they never reach it and are not sent again, so they are losses to count."""
    metrics = Metrics()
    sink = make_sink(receiver, metrics)
    emitter = Emitter(sinks=[sink])
    receiver.reject(3)
    try:
        for i in range(5):
            emitter.emit(allow(i))
        assert sink.flush(10)
        assert wait_until(lambda: receiver.count >= 5, 10)
    finally:
        sink.close()
    assert metrics.otlp_dropped.labels(reason="rejected")._value.get() == 3
    assert metrics.otlp_exported._value.get() == 2
    assert sink.processor.stats["dropped_rejected"] == 3
