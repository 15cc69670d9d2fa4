"""The single emission point: write-ahead sinks first, audit-required turns allows into denies."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import AuditUnavailable, Emitter, JsonLineSink, MemorySink


def decision(verdict: Verdict = Verdict.ALLOW, host: str = "pypi.org") -> Decision:
    reason = Reason.ALLOWED_BY_RULE if verdict is Verdict.ALLOW else Reason.NO_MATCHING_RULE
    return Decision(verdict, reason, "pypi", Kind.CONNECT, host, 443, "v1", "enforce")


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
    out = emitter.emit(decision())
    assert (out.decision, out.reason) == (Verdict.DENY, Reason.AUDIT_UNAVAILABLE)
    assert "disk full" in (out.detail or "")
    assert list(memory.decisions) == [out]  # the other sinks record what is enforced


def test_without_audit_required_the_failure_is_loud_but_the_decision_stands(
    caplog: pytest.LogCaptureFixture,
) -> None:
    emitter = Emitter([], write_ahead=[BrokenJournal()], audit_required=False)
    original = decision()
    assert emitter.emit(original) is original
    assert "audit journal write failed" in caplog.text


def test_denies_stay_denies_and_a_failing_best_effort_sink_changes_nothing() -> None:
    memory = MemorySink()
    emitter = Emitter([ExplodingSink(), memory], write_ahead=[BrokenJournal()], audit_required=True)
    denied = decision(Verdict.DENY)
    out = emitter.emit(denied)
    assert out.reason == Reason.NO_MATCHING_RULE  # not rewritten: it was never going to proceed
    assert list(memory.decisions) == [out]


def test_json_line_sink_writes_one_line_per_decision_even_for_hostile_values() -> None:
    stream = io.StringIO()
    sink = JsonLineSink(stream=stream)
    sink.record(decision(host='evil\n{"decision":"allow"}\r\x00'))
    sink.event("egress.connection.closed", {"server.address": "a\nb"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first: dict[str, Any] = json.loads(lines[0])
    assert (
        first["host"] == 'evil\n{"decision":"allow"}\r\x00' and first["event"] == "egress.decision"
    )
    assert all(" " <= ch <= "~" for ch in stream.getvalue().replace("\n", ""))
