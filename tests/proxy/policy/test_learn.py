"""The proposer: only traffic that flowed, grouped for review, never internal addresses or public
suffixes, IP literals flagged, counts and first/last seen on every entry, and it always loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.core.decision import Kind, Request, Verdict
from proxy.core.engine import decide
from proxy.policy.learn import observe, path_prefix, propose, registrable, render
from proxy.policy.loader import load_policy


def rec(host: str, port: int | None = 443, *, kind: str = "connect", decision: str = "report",
        reason: str = "no-matching-rule", ts: float = 1_700_000_000.0, **extra: Any) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"event": "egress.decision", "decision": decision, "reason": reason,
                           "kind": kind, "host": host, "ts": ts, **extra}  # fmt: skip
    if port is not None:
        out["port"] = port
    return out


def proposal(tmp_path: Path, records: list[dict[str, Any]], **kwargs: Any) -> tuple[str, Any]:
    text = render(propose(observe(records), **kwargs), ["test"])
    path = tmp_path / "proposal.yaml"
    path.write_text(text)
    return text, load_policy(path)


def allowed(policy: Any, host: str, port: int = 443) -> bool:
    return decide(Request(Kind.CONNECT, host, port), policy).decision is Verdict.ALLOW


def test_hosts_and_ports_with_counts_and_times(tmp_path: Path) -> None:
    records = [
        rec("pypi.org", ts=1_700_000_000.0),
        rec("pypi.org", ts=1_700_000_100.0),
        rec("files.pythonhosted.org"),
        rec("deb.debian.org", 80),
        rec("deb.debian.org", 443, decision="allow", reason="allowed-by-rule"),
        rec("evil.example", decision="deny", reason="denied-by-rule"),
        rec("meta.internal", decision="deny", reason="internal-address"),
    ]
    text, policy = proposal(tmp_path, records)
    assert "seen 2x, first 2023-11-14T22:13:20Z, last 2023-11-14T22:15:00Z" in text
    assert allowed(policy, "pypi.org") and allowed(policy, "files.pythonhosted.org")
    assert allowed(policy, "deb.debian.org", 80) and allowed(policy, "deb.debian.org", 443)
    assert not allowed(policy, "pypi.org", 80)  # not seen on 80
    assert not allowed(policy, "evil.example") and not allowed(policy, "meta.internal")
    assert "refused and not proposed: 1 decision(s) denied-by-rule" in text
    assert "refused and not proposed: 1 decision(s) internal-address" in text


def test_many_subdomains_are_grouped_under_the_registrable_domain_only(tmp_path: Path) -> None:
    many = [rec(f"s{i}.cdn.example.com") for i in range(5)] + [rec("example.com")]
    few = [rec("a.few.example.net"), rec("b.few.example.net")]
    text, policy = proposal(tmp_path, many + few)
    assert '"**.example.com"' in text and "5 subdomains seen" in text
    assert allowed(policy, "other.example.com")  # the grouping is the reviewable choice
    assert allowed(policy, "a.few.example.net") and not allowed(policy, "c.few.example.net")
    # a public suffix's tenants are never grouped under the suffix
    tenants = [rec(f"t{i}.github.io") for i in range(6)]
    text, policy = proposal(tmp_path, tenants)
    assert "github.io" not in [h.base for r in policy.rules for h in r.hosts if h.kind != "exact"]
    assert allowed(policy, "t1.github.io") and not allowed(policy, "t9.github.io")


def test_ip_literals_are_flagged_and_internal_ones_never_proposed(tmp_path: Path) -> None:
    text, policy = proposal(
        tmp_path,
        [
            rec("93.184.216.34"),
            rec("10.0.0.5", decision="allow", reason="allowed-by-rule"),
            rec("::1", decision="allow", reason="allowed-by-rule"),
        ],
    )
    assert "IP LITERAL" in text and "93.184.216.34/32" in text
    assert "10.0.0.5" not in text.split("version: 1")[1] and "never proposed: 10.0.0.5" in text
    assert [str(c) for r in policy.rules for c in r.cidrs] == ["93.184.216.34/32"]


def test_requests_become_methods_and_path_prefixes(tmp_path: Path) -> None:
    records = [
        rec("api.example.com", 443, kind="request", method="GET", path="/repos/a/b"),
        rec("api.example.com", 443, kind="request", method="GET", path="/repos/c"),
        rec(
            "api.example.com",
            443,
            kind="request",
            method="POST",
            path="/graphql",
            reason="request-not-allowed",
        ),
        rec("api.example.com", 443),
    ]
    _, policy = proposal(tmp_path, records)
    rules = {r.name: r for r in policy.rules}
    conditions = {(tuple(sorted(r.request.methods or ())), tuple(g.text for g in r.request.paths or ()))
                  for r in rules.values() if r.request is not None}  # fmt: skip
    assert conditions == {(("GET",), ("/repos/**",)), (("POST",), ("/graphql/**",))}
    assert path_prefix("/") == "/" and path_prefix("/a%20b/c") == "/**"


def test_min_count_since_sandbox_and_base(tmp_path: Path) -> None:
    records = [
        rec("rare.example.org", ts=100.0),
        rec("often.example.org", ts=200.0, sandbox_id="sb1"),
        rec("often.example.org", ts=300.0, sandbox_id="sb1"),
        rec("known.example.org", ts=300.0),
    ]
    text = render(propose(observe(records), min_count=2), ["t"])
    assert "often.example.org" in text and "left out rare.example.org" in text
    assert "rare" not in render(propose(observe(records, since=150.0)), ["t"])
    only = render(propose(observe(records, sandbox="sb1")), ["t"])
    assert "often" in only and "known" not in only
    base = tmp_path / "base.yaml"
    base.write_text("version: 1\nrules:\n  - {name: known, hosts: [known.example.org]}\n")
    text = render(propose(observe(records), base=load_policy(base)), ["t"])
    assert "known.example.org" not in text and "often.example.org" in text


def test_registrable_domains() -> None:
    assert registrable("a.b.pypi.org") == "pypi.org"
    assert registrable("x.github.io") == "x.github.io"
    assert registrable("github.io") is None and registrable("com") is None
    assert registrable("192.0.2.1") is None


def test_ipv6_literals_load(tmp_path: Path) -> None:
    text, policy = proposal(tmp_path, [rec("fd00::1"), rec("[2606:4700::1111]")])
    assert [str(c) for r in policy.rules for c in r.cidrs] == ["2606:4700::1111/128"]
    assert "never proposed: fd00::1" in text


def test_refusals_of_the_process_credential_and_ceiling_steps_are_never_proposed(
    tmp_path: Path,
) -> None:
    """A refusal keeps the policy reason it overrode only in the verdict: a report the managed
    policy refused, a process a bound rule refused, a credential misused - none is a gap."""
    records = [
        rec(
            "outside.example",
            decision="deny",
            reason="no-matching-rule",
            detail="...; outside the managed policy (no-matching-rule)",
        ),
        rec("git.example", decision="deny", reason="executable-not-allowed", exe="/usr/bin/curl"),
        rec("git.example", decision="deny", reason="process-unattributed"),
        rec(
            "paste.example",
            kind="request",
            method="POST",
            path="/x",
            decision="deny",
            reason="credential-misuse",
            credential="github",
        ),
        rec("pypi.org"),  # control: a gap report mode let through
    ]
    text, policy = proposal(tmp_path, records)
    assert allowed(policy, "pypi.org")
    for host in ("outside.example", "git.example", "paste.example"):
        assert host not in text and not allowed(policy, host)
    for reason in ("executable-not-allowed", "process-unattributed", "credential-misuse"):
        assert f"decision(s) {reason}" in text


def test_a_method_that_is_not_an_http_method_is_never_proposed(tmp_path: Path) -> None:
    """Methods are the sandbox's words: one that reads as YAML (``'X``, ``*X``) must not break the
    proposal, and one that reads as a list (``GET, DELETE``) must not slip a method nobody sent
    into it. Only RFC 9110 methods are proposed; the others are named in the notes."""
    sent = ("GET", "GET, DELETE", "'X", "*X", "&A", "|X", "get]", "X\nmode: report")
    records = [
        rec("api.example.com", kind="request", method=m, path="/x/y", reason="request-not-allowed")
        for m in sent
    ]
    text, policy = proposal(tmp_path, records)
    methods = {m for r in policy.rules if r.request is not None for m in r.request.methods or ()}
    assert methods == {"GET"}, text
    assert policy.mode.value == "enforce"
    assert "'GET, DELETE' on api.example.com:443: it is not an HTTP method" in text
    assert "\nmode: report" not in text  # the notes are comments, one line each


@pytest.mark.parametrize("brk", ["\n", "\r", "\x85", "\u2028", "\u2029"])
def test_a_field_of_a_refused_record_never_ends_its_comment(tmp_path: Path, brk: str) -> None:
    """Refusals are named in the notes by their reason, read from the record: a decision log has
    no hash chain, and an edited one must not put policy text (internal ranges, report mode) into
    the proposal through a line break YAML reads in a comment. Header lines (file names, the
    ``--sandbox`` given) are comments the same way."""
    injected = f"x{brk}allow_internal: [10.0.0.0/8]{brk}mode: report{brk}#"
    records = [rec("pypi.org"), rec("a.example", decision="deny", reason=injected)]
    text = render(propose(observe(records)), ["test", f"Sandbox a{brk}mode: report only."])
    path = tmp_path / "proposal.yaml"
    path.write_text(text)
    policy = load_policy(path)
    assert policy.mode.value == "enforce" and policy.allow_internal == (), text
    assert [r.name for r in policy.rules] == ["pypi.org"]
    assert all(line.startswith(("#", "version:", "rules:", " ")) for line in text.splitlines())
