"""The single emission point: write-ahead sinks first, audit-required turns allows into denies."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from proxy.core.decision import Decision, Reason, Verdict
from proxy.evidence.emit import AuditUnavailable, Emitter, JsonLineSink, MemorySink
from tests.proxy.evidence.decisions import allow, deny


class BrokenJournal:
    def __init__(self) -> None:
        self.calls = 0

    def record(self, d: Decision) -> None:
        self.calls += 1
        raise AuditUnavailable("disk full")

    def close(self) -> None:
        pass


class ExplodingSink:
    def record(self, d: Decision) -> None:
        raise RuntimeError("collector bug")

    def close(self) -> None:
        pass


def test_audit_required_turns_an_unrecordable_allow_into_a_deny() -> None:
    memory = MemorySink()
    emitter = Emitter([memory], write_ahead=[BrokenJournal()], audit_required=True)
    out = emitter.emit(allow())
    assert (out.decision, out.reason) == (Verdict.DENY, Reason.AUDIT_UNAVAILABLE)
    assert "disk full" in (out.detail or "")
    assert list(memory.decisions) == [out]  # the other sinks record what is enforced


def test_without_audit_required_the_failure_is_loud_but_the_decision_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    emitter = Emitter([], write_ahead=[BrokenJournal()], audit_required=False)
    original = allow()
    assert emitter.emit(original) is original
    assert "audit journal write failed" in caplog.text


def test_denies_stay_denies_and_a_failing_best_effort_sink_changes_nothing() -> None:
    memory = MemorySink()
    emitter = Emitter([ExplodingSink(), memory], write_ahead=[BrokenJournal()], audit_required=True)
    denied = deny()
    out = emitter.emit(denied)
    assert out.reason == Reason.NO_MATCHING_RULE  # not rewritten: it was never going to proceed
    assert list(memory.decisions) == [out]


def test_json_line_sink_writes_one_line_per_decision_even_for_hostile_values() -> None:
    stream = io.StringIO()
    sink = JsonLineSink(stream=stream)
    sink.record(allow(host='evil\n{"decision":"allow"}\r\x00'))
    sink.event("egress.connection.closed", {"server.address": "a\nb"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first: dict[str, Any] = json.loads(lines[0])
    assert (
        first["host"] == 'evil\n{"decision":"allow"}\r\x00' and first["event"] == "egress.decision"
    )
    assert all(" " <= ch <= "~" for ch in stream.getvalue().replace("\n", ""))


class JournalCopy:
    """A write-ahead sink that records decisions and events, or fails like a full disk."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def record(self, d: Decision) -> None:
        if self.fail:
            raise AuditUnavailable("disk full")

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        if self.fail:
            raise AuditUnavailable("disk full")

    def close(self) -> None:
        pass


class Reader:
    """A JournalReader: keeps what it is told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, bool]] = []

    def record_journaled(self, decision: Decision, journaled: bool) -> None:
        self.told.append((str(decision.reason), journaled))

    def event_journaled(self, name: str, attributes: dict[str, Any], journaled: bool) -> None:
        self.told.append((name, journaled))

    def record(self, decision: Decision) -> None:
        raise AssertionError("a JournalReader is told whether the journal recorded it")

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("write_ahead", "expected"),
    [
        ([], False),  # no journal: nothing is journaled
        ([JournalCopy()], True),
        ([JournalCopy(fail=True)], False),
        ([JournalCopy(), JournalCopy(fail=True)], False),  # only what every journal holds
    ],
)
def test_journal_readers_are_told_what_the_journal_recorded(
    write_ahead: list[JournalCopy], expected: bool
) -> None:
    reader = Reader()
    emitter = Emitter([reader], write_ahead=write_ahead, audit_required=False)
    emitter.emit(allow())
    emitter.event("egress.connection.closed", {"id": "x"})
    assert reader.told == [("allowed-by-rule", expected), ("egress.connection.closed", expected)]


def test_a_reader_gets_the_deny_the_journal_could_not_record() -> None:
    reader = Reader()
    emitter = Emitter([reader], write_ahead=[JournalCopy(fail=True)], audit_required=True)
    assert emitter.emit(allow()).reason is Reason.AUDIT_UNAVAILABLE
    assert reader.told == [("audit-unavailable", False)]


def test_a_decision_log_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """Its lines are the journal's text (hosts with userinfo, paths as received): created 0600 as
    the journal is, whatever the umask lets through."""
    old = os.umask(0o022)
    try:
        sink = JsonLineSink(path=str(tmp_path / "decisions.jsonl"))
    finally:
        os.umask(old)
    sink.record(deny(1))
    sink.close()
    assert stat.S_IMODE((tmp_path / "decisions.jsonl").stat().st_mode) == 0o600


@pytest.mark.parametrize("audit_required", [False, True])
def test_a_failing_journal_is_said_once_not_once_per_record(
    caplog: pytest.LogCaptureFixture, audit_required: bool
) -> None:
    """A full disk fails every record, thousands a second under load: the failure is logged at
    once, and then at most every few seconds with the count, never one line per record."""
    emitter = Emitter([], write_ahead=[BrokenJournal()], audit_required=audit_required)
    for i in range(1000):
        emitter.emit(deny(i))
    lines = [r for r in caplog.records if "audit journal write failed" in r.getMessage()]
    assert len(lines) == 1
    assert "refusal stands" in lines[0].getMessage()  # a deny never "proceeds"


def test_refused_allows_are_counted_and_the_rest_said_as_the_gate_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under --audit-required an allow the journal cannot take is refused: it is counted with
    the rest, and what was counted after the last line is said as the Emitter closes."""
    emitter = Emitter([], write_ahead=[BrokenJournal()], audit_required=True)
    for i in range(500):
        emitter.emit(allow(i))
    said = [r.getMessage() for r in caplog.records if "audit journal" in r.getMessage()]
    assert len(said) == 1 and "refused (--audit-required)" in said[0]
    emitter.close()
    said = [r.getMessage() for r in caplog.records if "audit journal" in r.getMessage()]
    assert len(said) == 2 and "499 record(s) not journaled" in said[1], said
