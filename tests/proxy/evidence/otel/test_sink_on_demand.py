"""An on-demand OTel sink (a private gate's, started for one command): the export process starts at
the first record the journal holds, and the in-process exporter at the first it could not take; a
run that records nothing starts neither, and nothing recorded is ever left out."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from proxy.evidence.emit import Emitter
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.cursor import cursor_path, read_cursor, write_cursor
from tests.harness import fresh_python
from tests.proxy.evidence.decisions import allow
from tests.proxy.evidence.otel.receivers import Receiver, make_sink

ROOT = Path(__file__).resolve().parents[4]


def test_a_run_that_records_nothing_starts_no_exporter(receiver: Receiver, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "audit.jsonl")
    sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
    assert sink.process is not None
    try:
        assert sink.process._proc is None
        assert sink.flush(1)
    finally:
        sink.close()
        journal.close()
    assert sink.process._proc is None and sink._processor is None
    assert read_cursor(cursor_path(journal.path)) is None  # no export process ever wrote one
    time.sleep(0.2)
    assert receiver.records == []


def test_the_first_journaled_record_starts_it_and_every_record_arrives_once(
    receiver: Receiver, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    history = Journal(path)
    for i in range(4):  # written before OTLP was configured: not sent
        history.record(allow(1000 + i))
    history.close()
    metrics = Metrics()
    journal = Journal(path, metrics=metrics)
    sink = make_sink(receiver, metrics, journal=journal, on_demand=True)
    emitter = Emitter(sinks=[sink], write_ahead=[journal])
    assert sink.process is not None and sink.process._proc is None
    try:
        ids = [emitter.emit(allow(i)).id for i in range(6)]
        assert sink.process._proc is not None
        assert sink.flush(20)
        time.sleep(0.3)
        got = receiver.records
    finally:
        sink.close()
        journal.close()
    received = [r.attributes["egress.decision.id"] for r in got]
    assert sorted(received) == sorted(ids)  # the first included, each once, none of the history
    assert sink._processor is None  # the journal took every record
    assert read_cursor(cursor_path(path)) == 4 + 6


def test_a_backlog_left_by_an_earlier_run_is_sent_at_once(
    receiver: Receiver, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    earlier = Journal(path)
    for i in range(5):
        earlier.record(allow(i))
    earlier.close()
    write_cursor(cursor_path(path), 2)  # the earlier run's collector took the first two
    journal = Journal(path)
    sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
    try:
        assert sink.process is not None and sink.process._proc is not None
        receiver.wait_for(3, timeout=20)
    finally:
        sink.close()
        journal.close()
    time.sleep(0.3)
    got = receiver.records  # after close: a record sent twice would be here twice
    assert sorted(r.attributes["egress.journal.seq"] for r in got) == [3, 4, 5]


def test_what_the_journal_could_not_take_is_exported_in_process(
    receiver: Receiver, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "audit.jsonl")
    sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
    decision = allow(7)
    try:
        assert sink._processor is None
        sink.record_journaled(decision, False)  # as the Emitter says when the journal failed
        got = receiver.wait_for(1, timeout=15)
    finally:
        sink.close()
        journal.close()
    assert [r.attributes["egress.decision.id"] for r in got] == [decision.id]
    assert sink.process is not None and sink.process._proc is None


def test_an_on_demand_sink_loads_no_exporter_code_until_it_is_needed(tmp_path: Path) -> None:
    """The gate of a run that makes no connection never loads protobuf, OpenTelemetry or an HTTP
    client: about 100 ms of every such run's start."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from pathlib import Path;"
        "from proxy.evidence.journal.writer import Journal;"
        "from proxy.evidence.otel.endpoint import resolve_endpoint;"
        "from proxy.evidence.otel.sink import OtelSink;"
        "target = resolve_endpoint('http://127.0.0.1:9/v1/logs', 'http', env={});"
        "journal = Journal(Path(sys.argv[2]));"
        "sink = OtelSink(target, journal=journal, on_demand=True);"
        "sink.close(0.1); journal.close();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('google', 'requests', 'grpc', 'urllib3')"
        " or m.startswith(('opentelemetry.sdk', 'opentelemetry.proto'))))"
    )
    assert fresh_python(code, str(ROOT), str(tmp_path / "audit.jsonl")).strip() == "[]"


def test_an_export_process_that_cannot_start_is_tried_again_and_loses_nothing(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting it on demand happens on the gate's event loop: a failure there (no descriptors, no
    memory) must neither reach the decision nor lose the records the journal holds."""
    from proxy.evidence.otel import supervisor

    real = subprocess.Popen
    attempts: list[int] = []

    def failing_once(*args: object, **kwargs: object) -> object:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(24, "Too many open files")
        return real(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "Popen", failing_once)
    monkeypatch.setattr(supervisor, "LAUNCH_RETRY", 1.0)
    journal = Journal(tmp_path / "audit.jsonl")
    sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
    emitter = Emitter(sinks=[sink], write_ahead=[journal])
    try:
        first = emitter.emit(allow(1))
        assert first.allowed and sink.process is not None and sink.process._proc is None
        second = emitter.emit(allow(2))  # within the retry delay: not tried again
        assert len(attempts) == 1
        time.sleep(1.2)
        third = emitter.emit(allow(3))
        assert sink.process._proc is not None
        assert sink.flush(20)
        got = receiver.records
    finally:
        sink.close()
        journal.close()
    assert sorted(r.attributes["egress.decision.id"] for r in got) == sorted(
        d.id for d in (first, second, third)
    )


def test_records_a_run_could_not_export_are_sent_by_the_next_gate(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No export process could be started during the whole run (not even at its close): the next
    gate must send the run's records, not take the journal as never exported and skip them."""
    path = tmp_path / "audit.jsonl"
    history = Journal(path)
    history.record(allow(1000))  # from before OTLP was configured: never sent
    history.close()

    def failing(*args: object, **kwargs: object) -> object:
        raise OSError(12, "Cannot allocate memory")

    with monkeypatch.context() as patched:
        patched.setattr(subprocess, "Popen", failing)
        journal = Journal(path)
        sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
        emitter = Emitter(sinks=[sink], write_ahead=[journal])
        ids = [emitter.emit(allow(i)).id for i in range(3)]
        sink.close(timeout=1.0)
        journal.close()
    assert read_cursor(cursor_path(path)) == 1  # where the failed run stood

    journal = Journal(path)
    sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
    try:
        assert sink.process is not None and sink.process._proc is not None  # a backlog: at once
        receiver.wait_for(3, timeout=20)
    finally:
        sink.close()
        journal.close()
    time.sleep(0.3)
    assert sorted(r.attributes["egress.decision.id"] for r in receiver.records) == sorted(ids)


def test_a_cursor_past_the_journals_end_skips_nothing(receiver: Receiver, tmp_path: Path) -> None:
    """A cursor left by another journal at the same path (the file replaced, the cursor not): the
    new journal is exported from its start of export, not from the old cursor's seq."""
    path = tmp_path / "audit.jsonl"
    write_cursor(cursor_path(path), 500)
    journal = Journal(path)
    sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
    emitter = Emitter(sinks=[sink], write_ahead=[journal])
    try:
        ids = [emitter.emit(allow(i)).id for i in range(2)]
        receiver.wait_for(2, timeout=20)
    finally:
        sink.close()
        journal.close()
    assert sorted(r.attributes["egress.decision.id"] for r in receiver.records) == sorted(ids)


def test_a_supervisor_that_cannot_start_leaves_no_child(
    receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process started but its supervising thread could not be: the child is ended (else each
    later record would start one more, each exporting the same journal)."""
    from proxy.evidence.otel import supervisor

    started: list[subprocess.Popen[str]] = []
    real = subprocess.Popen

    def recording(*args: object, **kwargs: object) -> subprocess.Popen[str]:
        proc: subprocess.Popen[str] = real(*args, **kwargs)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    class NoThread(threading.Thread):  # only the supervisor's thread fails to start
        def start(self) -> None:
            if self.name == "otlp-process":
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(subprocess, "Popen", recording)
    monkeypatch.setattr(supervisor.threading, "Thread", NoThread)
    journal = Journal(tmp_path / "audit.jsonl")
    sink = make_sink(receiver, Metrics(), journal=journal, on_demand=True)
    emitter = Emitter(sinks=[sink], write_ahead=[journal])
    try:
        for i in range(3):
            emitter.emit(allow(i))
        assert len(started) == 1  # tried once, then not again within the retry delay
        assert started[0].poll() is not None  # and that child is gone
        assert sink.process is not None and sink.process._proc is None
    finally:
        monkeypatch.undo()
        sink.close()
        journal.close()
