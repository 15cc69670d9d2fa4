"""The export process: restarted when it dies, gone after close, resuming from its cursor."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from proxy.evidence.emit import Emitter
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from tests.proxy.evidence.decisions import allow
from tests.proxy.evidence.otel.receivers import Receiver, make_sink


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
