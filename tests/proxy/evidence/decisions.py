"""Decisions the evidence tests record: an allowed tunnel, a denied HTTP request with secrets in it,
a denied DNS question."""

from __future__ import annotations

from proxy.core.decision import Decision, Kind, Reason, Verdict


def allow(i: int = 0, **changes: object) -> Decision:
    d = Decision(
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
    return d.with_(**changes) if changes else d


def deny(i: int = 0) -> Decision:
    return allow(i, decision=Verdict.DENY, reason=Reason.NO_MATCHING_RULE, rule=None, address=None)


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
