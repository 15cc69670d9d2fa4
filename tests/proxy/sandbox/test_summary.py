"""The exit summary agrees with the decisions and cannot write escape sequences to a terminal."""

from __future__ import annotations

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.sandbox.summary import MAX_LISTED, SummarySink


def d(verdict: Verdict, host: str, kind: Kind = Kind.CONNECT, reason: Reason = Reason.ALLOWED_BY_RULE,
      port: int | None = 443) -> Decision:  # fmt: skip
    return Decision(verdict, reason, None, kind, host, port, "v1", "enforce", qtype="A")


def test_counts_and_lists_refusals() -> None:
    s = SummarySink()
    s.record(d(Verdict.ALLOW, "pypi.org"))
    s.record(d(Verdict.ALLOW, "pypi.org", Kind.TLS))  # part of the CONNECT: not a second request
    s.record(d(Verdict.ALLOW, "pypi.org", Kind.DNS, port=None))
    for _ in range(3):
        s.record(d(Verdict.DENY, "evil.example", reason=Reason.NO_MATCHING_RULE))
    s.record(d(Verdict.DENY, "evil.example", Kind.DNS, Reason.NO_MATCHING_RULE, port=None))
    s.record(d(Verdict.REPORT, "maybe.example", reason=Reason.NO_MATCHING_RULE))
    text = s.render("sbx-1")
    lines = text.splitlines()
    assert lines[0] == "egress: sandbox sbx-1: 2 request(s) allowed, 4 refused, 1 DNS answer(s)"
    assert "  refused evil.example:443: no-matching-rule (x3)" in lines
    assert "  refused evil.example (DNS A): no-matching-rule" in lines
    assert "  would refuse maybe.example:443: no-matching-rule" in lines


def test_hostile_names_are_escaped() -> None:
    s = SummarySink()
    s.record(d(Verdict.DENY, "\x1b[2Jevil\nhost", reason=Reason.INVALID_HOST))
    text = s.render("sbx")
    assert "\x1b" not in text and text.count("\n") == 1
    assert "\\x1b[2Jevil\\x0ahost" in text


def test_a_query_the_gate_could_not_read_is_listed_without_a_name() -> None:
    s = SummarySink()
    unread = Decision(Verdict.DENY, Reason.DNS_FAILURE, None, Kind.DNS, "", None, "v1", "enforce")
    s.record(unread)
    assert "  refused (unread) (DNS ?): dns-failure" in s.render("sbx").splitlines()


def test_long_lists_are_bounded() -> None:
    s = SummarySink()
    for i in range(MAX_LISTED + 5):
        s.record(d(Verdict.DENY, f"h{i}.example", reason=Reason.NO_MATCHING_RULE))
    text = s.render("sbx")
    assert "... and 5 more refused destination(s)" in text
    assert len(text.splitlines()) == MAX_LISTED + 2


def test_a_held_request_counts_once_by_its_outcome() -> None:
    s = SummarySink()
    s.record(d(Verdict.ASK, "api.example", reason=Reason.APPROVAL_PENDING))
    s.record(d(Verdict.ALLOW, "api.example", reason=Reason.APPROVAL_GRANTED))
    s.record(d(Verdict.ASK, "api.example", reason=Reason.APPROVAL_PENDING))
    s.record(d(Verdict.DENY, "api.example", reason=Reason.APPROVAL_TIMEOUT))
    lines = s.render("sbx-1").splitlines()
    assert lines[0] == "egress: sandbox sbx-1: 1 request(s) allowed, 1 refused, 0 DNS answer(s)"
    assert "  refused api.example:443: approval-timeout" in lines


def test_the_json_summary_counts_per_process_and_destination() -> None:
    import json

    from proxy.core.decision import Decision, Kind, Reason, Verdict
    from proxy.sandbox.summary import SummarySink

    def decision(verdict: Verdict, reason: Reason, exe: str | None, pid: int | None) -> Decision:
        return Decision(
            verdict, reason, "r", Kind.CONNECT, "h.test", 443, "v", "enforce", exe=exe, pid=pid
        )

    sink = SummarySink()
    sink.record(decision(Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "/usr/bin/git", 5))
    sink.record(decision(Verdict.DENY, Reason.EXECUTABLE_NOT_ALLOWED, "/usr/bin/curl", 7))
    sink.record(decision(Verdict.DENY, Reason.PROCESS_UNATTRIBUTED, None, None))
    out = json.loads(sink.render_json("sbx-1"))
    assert (out["sandbox_id"], out["allowed"], out["refused"]) == ("sbx-1", 1, 2)
    assert out["processes"] == [
        {"exe": "(unattributed)", "pids": [], "allowed": 0, "refused": 1,
         "reasons": {"process-unattributed": 1}},
        {"exe": "/usr/bin/curl", "pids": [7], "allowed": 0, "refused": 1,
         "reasons": {"executable-not-allowed": 1}},
        {"exe": "/usr/bin/git", "pids": [5], "allowed": 1, "refused": 0,
         "reasons": {"allowed-by-rule": 1}},
    ]  # fmt: skip
    assert out["destinations"] == [
        {"destination": "h.test:443", "allowed": 1, "refused": 2,
         "reasons": {"allowed-by-rule": 1, "executable-not-allowed": 1, "process-unattributed": 1}}
    ]  # fmt: skip
