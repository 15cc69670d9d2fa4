"""The refusal text: actionable for an agent, and nothing in it a client could use to forge."""

from __future__ import annotations

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.core.refusal import refusal_text


def denied(reason: Reason, **fields: object) -> Decision:
    base = Decision(Verdict.DENY, reason, None, Kind.HTTP, "evil.test", 80, "v1", "enforce")
    return base.with_(**fields) if fields else base


def test_allowlist_gaps_suggest_the_rule_a_human_could_add() -> None:
    text = refusal_text(denied(Reason.NO_MATCHING_RULE, method="GET", path="/x"))
    assert "GET evil.test:80 /x" in text
    assert "restricted by policy" in text and "hosts: [evil.test]" in text and "ports: [80]" in text


def test_safety_refusals_do_not_suggest_an_allowlist_rule() -> None:
    text = refusal_text(denied(Reason.INTERNAL_ADDRESS, detail="resolves to 127.0.0.1"))
    assert "hosts: [" not in text and "report the decision id" in text


def test_explicit_deny_rules_do_not_suggest_an_allowlist_rule() -> None:
    text = refusal_text(denied(Reason.DENIED_BY_RULE, rule="no-ssh"))
    assert "hosts: [" not in text and "no-ssh" in text


def test_client_controlled_method_and_path_are_escaped() -> None:
    text = refusal_text(denied(Reason.NO_MATCHING_RULE, method="G\x1b[2JET", path="/a\x00b\x7f"))
    assert "\x1b" not in text and "\x00" not in text and "\x7f" not in text
    assert "\\x1b" in text


def test_request_refusals_suggest_the_request_rule_a_human_could_add() -> None:
    text = refusal_text(
        denied(Reason.REQUEST_NOT_ALLOWED, kind=Kind.REQUEST, method="put", path="/pkg\x1b")
    )
    assert "PUT evil.test:80 /pkg\\x1b" in text and "\x1b" not in text
    assert "methods: [PUT]" in text and 'paths: ["/pkg\\x1b"]' in text
    assert "only for the requests its rules list" in text


def test_ambiguous_requests_suggest_nothing() -> None:
    text = refusal_text(denied(Reason.AMBIGUOUS_REQUEST, kind=Kind.REQUEST, path="/a/../b"))
    assert "methods: [" not in text and "report the decision id" in text
