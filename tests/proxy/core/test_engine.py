"""decide() and refuse(): the decision order, matching semantics and report mode, table-driven."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from proxy.core.decision import Kind, Reason, Request, Verdict
from proxy.core.engine import REPORTABLE_REASONS, decide, refuse
from proxy.policy.loader import load_policy
from proxy.policy.model import Mode, Policy

POLICY = """
version: 1
rules:
  - name: pypi
    hosts: [pypi.org, files.pythonhosted.org]
  - name: sub-only
    hosts: ["*.sub.example"]
  - name: tree
    hosts: ["**.tree.example"]
  - name: tree-api
    hosts: [api.tree.example]
    ports: [443, 8443]
  - name: deep-sub
    hosts: ["*.deep.tree.example"]
  - name: apt
    hosts: [deb.debian.org]
    ports: [80, 443]
  - name: github
    hosts: [github.com, "**.githubusercontent.com.example"]
  - name: no-ssh
    action: deny
    hosts: [github.com]
    ports: [22]
  - name: blocked
    action: deny
    hosts: ["**.bad.tree.example"]
  - name: blocked-exact
    action: deny
    hosts: [evil.sub.example]
    ports: [443]
  - name: idn
    hosts: ["bücher.example", "*.münchen.example.com"]
  - name: cache-net
    cidrs: [203.0.113.0/24, "2001:db8:1::/48"]
  - name: cache-host
    cidrs: [203.0.113.7/32]
    ports: [8443]
  - name: no-cache-ssh
    action: deny
    cidrs: [203.0.113.0/28]
    ports: [22]
  - name: internal-names
    hosts: [ex.com]
"""


def make_policy(tmp_path: Path, text: str = POLICY, mode: str | None = None) -> Policy:
    body = textwrap.dedent(text).lstrip("\n")
    if mode is not None:
        body = body.replace("version: 1\n", f"version: 1\nmode: {mode}\n", 1)
    path = tmp_path / "policy.yaml"
    path.write_text(body, encoding="utf-8")
    return load_policy(path)


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return make_policy(tmp_path)


ALLOW, DENY = Verdict.ALLOW, Verdict.DENY

CONNECT_CASES = [
    # host, port, verdict, reason, rule
    ("pypi.org", 443, ALLOW, Reason.ALLOWED_BY_RULE, "pypi"),
    ("PyPI.ORG", 443, ALLOW, Reason.ALLOWED_BY_RULE, "pypi"),
    ("pypi.org.", 443, ALLOW, Reason.ALLOWED_BY_RULE, "pypi"),
    ("files.pythonhosted.org", 443, ALLOW, Reason.ALLOWED_BY_RULE, "pypi"),
    # suffix traps: exact patterns match exactly, nothing else
    ("pypi.org.evil.com", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("evilpypi.org", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("www.pypi.org", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("org", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("pythonhosted.org", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("eviltree.example", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("tree.example.evil.com", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("sub.example.com", 443, DENY, Reason.NO_MATCHING_RULE, None),
    # `*.x`: any depth below x, never x itself
    ("a.sub.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "sub-only"),
    ("a.b.c.sub.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "sub-only"),
    ("sub.example", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("xsub.example", 443, DENY, Reason.NO_MATCHING_RULE, None),
    # `**.x`: x and any depth below it
    ("tree.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "tree"),
    ("a.tree.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "tree"),
    ("a.b.tree.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "tree"),
    # most specific rule is named: exact beats wildcard, longer base beats shorter
    ("api.tree.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "tree-api"),
    ("x.deep.tree.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "deep-sub"),
    ("deep.tree.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "tree"),
    # a less specific rule allows a port the more specific one does not list
    ("api.tree.example", 8443, ALLOW, Reason.ALLOWED_BY_RULE, "tree-api"),
    ("www.tree.example", 8443, DENY, Reason.PORT_NOT_ALLOWED, "tree"),
    # ports: default 443 only; listed ports only
    ("pypi.org", 80, DENY, Reason.PORT_NOT_ALLOWED, "pypi"),
    ("pypi.org", 22, DENY, Reason.PORT_NOT_ALLOWED, "pypi"),
    ("pypi.org", 8443, DENY, Reason.PORT_NOT_ALLOWED, "pypi"),
    ("deb.debian.org", 80, ALLOW, Reason.ALLOWED_BY_RULE, "apt"),
    ("deb.debian.org", 443, ALLOW, Reason.ALLOWED_BY_RULE, "apt"),
    ("deb.debian.org", 21, DENY, Reason.PORT_NOT_ALLOWED, "apt"),
    # deny beats allow, whatever the specificity; port-limited deny only on its ports
    ("github.com", 22, DENY, Reason.DENIED_BY_RULE, "no-ssh"),
    ("github.com", 443, ALLOW, Reason.ALLOWED_BY_RULE, "github"),
    ("bad.tree.example", 443, DENY, Reason.DENIED_BY_RULE, "blocked"),
    ("x.bad.tree.example", 443, DENY, Reason.DENIED_BY_RULE, "blocked"),
    ("x.bad.tree.example", 8443, DENY, Reason.DENIED_BY_RULE, "blocked"),  # deny: every port
    ("evil.sub.example", 443, DENY, Reason.DENIED_BY_RULE, "blocked-exact"),
    ("evil.sub.example", 8443, DENY, Reason.PORT_NOT_ALLOWED, "sub-only"),
    ("x.evil.sub.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "sub-only"),
    # IDN: Unicode and punycode spellings are one name
    ("bücher.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "idn"),
    ("BÜCHER.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "idn"),
    ("xn--bcher-kva.example", 443, ALLOW, Reason.ALLOWED_BY_RULE, "idn"),
    ("a.münchen.example.com", 443, ALLOW, Reason.ALLOWED_BY_RULE, "idn"),
    ("a.xn--mnchen-3ya.example.com", 443, ALLOW, Reason.ALLOWED_BY_RULE, "idn"),
    ("münchen.example.com", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("bucher.example", 443, DENY, Reason.NO_MATCHING_RULE, None),
    # IP literals: only cidrs match, in every spelling; longest prefix is named
    ("203.0.113.9", 443, ALLOW, Reason.ALLOWED_BY_RULE, "cache-net"),
    ("3405803785", 443, ALLOW, Reason.ALLOWED_BY_RULE, "cache-net"),  # decimal 203.0.113.9
    ("0xcb.0.0x71.9", 443, ALLOW, Reason.ALLOWED_BY_RULE, "cache-net"),
    ("[::ffff:203.0.113.9]", 443, ALLOW, Reason.ALLOWED_BY_RULE, "cache-net"),
    ("203.0.113.7", 8443, ALLOW, Reason.ALLOWED_BY_RULE, "cache-host"),
    ("203.0.113.7", 443, ALLOW, Reason.ALLOWED_BY_RULE, "cache-net"),
    ("203.0.113.99", 8443, DENY, Reason.PORT_NOT_ALLOWED, "cache-net"),
    ("203.0.113.7", 22, DENY, Reason.DENIED_BY_RULE, "no-cache-ssh"),
    ("203.0.113.200", 22, DENY, Reason.PORT_NOT_ALLOWED, "cache-net"),
    ("203.0.114.1", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("[2001:db8:1:ffff::5]", 443, ALLOW, Reason.ALLOWED_BY_RULE, "cache-net"),
    ("2001:db8:2::5", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("127.0.0.1", 443, DENY, Reason.NO_MATCHING_RULE, None),
    ("127.1", 443, DENY, Reason.NO_MATCHING_RULE, None),
    # invalid hosts are refused before any rule is looked at
    ("pypi.org\r\nX-Evil: 1", 443, DENY, Reason.INVALID_HOST, None),
    ("user@pypi.org", 443, DENY, Reason.INVALID_HOST, None),
    ("pypi\x00.org", 443, DENY, Reason.INVALID_HOST, None),
    ("a..pypi.org", 443, DENY, Reason.INVALID_HOST, None),
    ("", 443, DENY, Reason.INVALID_HOST, None),
    ("x" * 64 + ".pypi.org", 443, DENY, Reason.INVALID_HOST, None),
]


@pytest.mark.parametrize(("host", "port", "verdict", "reason", "rule"), CONNECT_CASES)
def test_connect(
    policy: Policy, host: str, port: int, verdict: Verdict, reason: Reason, rule: str | None
) -> None:
    decision = decide(Request(Kind.CONNECT, host, port), policy)
    assert (decision.decision, decision.reason, decision.rule) == (verdict, reason, rule)


def test_wildcard_never_matches_an_ip_literal(tmp_path: Path) -> None:
    # 1.0.0.127.in-addr style names and numeric labels must not be reachable through `**.`
    policy = make_policy(
        tmp_path,
        """
        version: 1
        rules:
          - name: tree
            hosts: ["**.example.com"]
        """,
    )
    for host in ("10.0.0.1", "[::1]", "2852039166", "0x7f.1"):
        decision = decide(Request(Kind.CONNECT, host, 443), policy)
        assert decision.reason is Reason.NO_MATCHING_RULE, host


def test_canonical_host_is_recorded(policy: Policy) -> None:
    decision = decide(Request(Kind.CONNECT, "BÜCHER.example.", 443), policy)
    assert decision.host == "xn--bcher-kva.example"
    decision = decide(Request(Kind.CONNECT, "0xcb.0.0x71.9", 443), policy)
    assert decision.host == "203.0.113.9"
    decision = decide(Request(Kind.CONNECT, "[2001:DB8:1::5]", 443), policy)
    assert decision.host == "2001:db8:1::5"


def test_invalid_host_is_rendered_safely(policy: Policy) -> None:
    raw = 'evil"\r\n{"decision":"allow"}\x00' + "é" * 400
    decision = decide(Request(Kind.CONNECT, raw, 443), policy)
    assert decision.reason is Reason.INVALID_HOST
    assert decision.host.isascii() and decision.host.isprintable()
    assert "\n" not in decision.host and "\r" not in decision.host
    assert len(decision.host) <= 256 + 3
    assert decision.host.endswith("...")
    assert decision.detail is not None and "\n" not in decision.detail
    assert json.loads(json.dumps(decision.to_dict()))["host"] == decision.host


# --- TLS: SNI checks come before rules -----------------------------------------------------------

TLS_CASES = [
    # connect host, sni, reason, rule
    ("pypi.org", "pypi.org", Reason.ALLOWED_BY_RULE, "pypi"),
    ("pypi.org", "PYPI.org.", Reason.ALLOWED_BY_RULE, "pypi"),
    ("bücher.example", "xn--bcher-kva.example", Reason.ALLOWED_BY_RULE, "idn"),
    ("pypi.org", None, Reason.SNI_MISSING, None),
    ("pypi.org", "", Reason.SNI_MISSING, None),
    ("pypi.org", "evil.com", Reason.SNI_MISMATCH, None),
    ("pypi.org", "files.pythonhosted.org", Reason.SNI_MISMATCH, None),  # both allowed: still no
    ("pypi.org", "pypi.org\x00", Reason.SNI_MISMATCH, None),
    ("pypi.org", "203.0.113.9", Reason.SNI_MISMATCH, None),
    ("203.0.113.9", "pypi.org", Reason.SNI_MISMATCH, None),
    ("203.0.113.9", "203.0.113.9", Reason.SNI_MISMATCH, None),  # SNI must never carry an address
    ("203.0.113.9", None, Reason.ALLOWED_BY_RULE, "cache-net"),
    ("example.net", None, Reason.SNI_MISSING, None),  # SNI checks come before the rule lookup
    ("example.net", "example.net", Reason.NO_MATCHING_RULE, None),
    ("github.com", "github.com", Reason.ALLOWED_BY_RULE, "github"),
]


@pytest.mark.parametrize(("host", "sni", "reason", "rule"), TLS_CASES)
def test_tls(policy: Policy, host: str, sni: str | None, reason: Reason, rule: str | None) -> None:
    decision = decide(Request(Kind.TLS, host, 443, sni=sni), policy)
    assert (decision.reason, decision.rule) == (reason, rule)
    assert decision.decision is (
        Verdict.ALLOW if reason is Reason.ALLOWED_BY_RULE else Verdict.DENY
    )


def test_kind_given_as_plain_string_is_still_checked(policy: Policy) -> None:
    request = Request("tls", "pypi.org", 443, sni="evil.com")  # type: ignore[arg-type]
    assert decide(request, policy).reason is Reason.SNI_MISMATCH
    dns = Request("dns", "github.com", None)  # type: ignore[arg-type]
    assert decide(dns, policy).reason is Reason.ALLOWED_BY_RULE


def test_sni_is_not_checked_for_other_kinds(policy: Policy) -> None:
    decision = decide(Request(Kind.CONNECT, "pypi.org", 443, sni="evil.com"), policy)
    assert decision.reason is Reason.ALLOWED_BY_RULE


# --- DNS: no port ----------------------------------------------------------------------------------

DNS_CASES = [
    ("pypi.org", ALLOW, Reason.ALLOWED_BY_RULE, "pypi"),
    ("deb.debian.org", ALLOW, Reason.ALLOWED_BY_RULE, "apt"),
    ("api.tree.example", ALLOW, Reason.ALLOWED_BY_RULE, "tree-api"),
    ("github.com", ALLOW, Reason.ALLOWED_BY_RULE, "github"),  # a port-22 deny must not block DNS
    ("evil.sub.example", ALLOW, Reason.ALLOWED_BY_RULE, "sub-only"),  # deny is for 443 only
    ("x.bad.tree.example", DENY, Reason.DENIED_BY_RULE, "blocked"),  # deny on every port
    ("data.exfil.attacker.example", DENY, Reason.NO_MATCHING_RULE, None),
    ("sub.example", DENY, Reason.NO_MATCHING_RULE, None),
    ("bad\nname", DENY, Reason.INVALID_HOST, None),
]


@pytest.mark.parametrize(("qname", "verdict", "reason", "rule"), DNS_CASES)
def test_dns(
    policy: Policy, qname: str, verdict: Verdict, reason: Reason, rule: str | None
) -> None:
    decision = decide(Request(Kind.DNS, qname, None, qtype="A"), policy)
    assert (decision.decision, decision.reason, decision.rule) == (verdict, reason, rule)
    assert decision.port is None and decision.qtype == "A"


def test_missing_port_outside_dns_fails_closed(policy: Policy) -> None:
    decision = decide(Request(Kind.CONNECT, "pypi.org", None), policy)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.PORT_NOT_ALLOWED)


# --- report mode ---------------------------------------------------------------------------------

REPORT_CASES = [
    # kind, host, port, sni, verdict in report mode, reason
    (Kind.CONNECT, "pypi.org", 443, None, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
    (Kind.CONNECT, "example.net", 443, None, Verdict.REPORT, Reason.NO_MATCHING_RULE),
    (Kind.CONNECT, "pypi.org", 22, None, Verdict.REPORT, Reason.PORT_NOT_ALLOWED),
    (Kind.CONNECT, "github.com", 22, None, Verdict.DENY, Reason.DENIED_BY_RULE),
    (Kind.CONNECT, "bad\r\nhost", 443, None, Verdict.DENY, Reason.INVALID_HOST),
    (Kind.TLS, "pypi.org", 443, "evil.com", Verdict.DENY, Reason.SNI_MISMATCH),
    (Kind.TLS, "pypi.org", 443, None, Verdict.DENY, Reason.SNI_MISSING),
    (Kind.DNS, "example.net", None, None, Verdict.REPORT, Reason.NO_MATCHING_RULE),
]


@pytest.mark.parametrize(("kind", "host", "port", "sni", "verdict", "reason"), REPORT_CASES)
def test_report_mode_only_relaxes_policy_reasons(
    tmp_path: Path,
    kind: Kind,
    host: str,
    port: int | None,
    sni: str | None,
    verdict: Verdict,
    reason: Reason,
) -> None:
    report = make_policy(tmp_path, mode="report")
    assert report.mode is Mode.REPORT
    decision = decide(Request(kind, host, port, sni=sni), report)
    assert (decision.decision, decision.reason, decision.mode) == (verdict, reason, "report")
    assert decision.allowed is (verdict is not Verdict.DENY)
    # The same request in enforce mode: same reason, and never more permissive.
    enforce = make_policy(tmp_path)
    strict = decide(Request(kind, host, port, sni=sni), enforce)
    assert strict.reason is reason
    assert strict.decision is (Verdict.ALLOW if reason is Reason.ALLOWED_BY_RULE else Verdict.DENY)


def test_report_mode_relaxes_exactly_the_allowlist_gaps() -> None:
    """Explicit deny rules are decisions already taken: they hold in report mode. A request no
    request rule allows is a gap in the allowlist like a host or a port, so a team can learn request
    rules in report mode too (ambiguous requests stay safety refusals)."""
    assert {
        Reason.NO_MATCHING_RULE,
        Reason.PORT_NOT_ALLOWED,
        Reason.REQUEST_NOT_ALLOWED,
    } == REPORTABLE_REASONS


RULE_MODES = """
version: 1
mode: {mode}
rules:
  - name: learning
    hosts: [learn.example]
    mode: report
  - name: strict
    hosts: [strict.example]
    mode: enforce
  - name: plain
    hosts: [plain.example]
  - name: trial-deny
    action: deny
    hosts: [plain.example]
    ports: [8080]
    mode: report
  - name: held-deny
    action: deny
    hosts: [plain.example]
    ports: [22]
"""

RULE_MODE_CASES = [
    # policy mode, host, port, verdict, reason, decision mode
    ("enforce", "learn.example", 8443, Verdict.REPORT, Reason.PORT_NOT_ALLOWED, "report"),
    ("enforce", "learn.example", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "enforce"),
    ("enforce", "strict.example", 8443, Verdict.DENY, Reason.PORT_NOT_ALLOWED, "enforce"),
    ("enforce", "plain.example", 8443, Verdict.DENY, Reason.PORT_NOT_ALLOWED, "enforce"),
    ("enforce", "plain.example", 8080, Verdict.REPORT, Reason.DENIED_BY_RULE, "report"),
    ("enforce", "plain.example", 22, Verdict.DENY, Reason.DENIED_BY_RULE, "enforce"),
    ("enforce", "other.example", 443, Verdict.DENY, Reason.NO_MATCHING_RULE, "enforce"),
    ("report", "strict.example", 8443, Verdict.DENY, Reason.PORT_NOT_ALLOWED, "enforce"),
    ("report", "plain.example", 8443, Verdict.REPORT, Reason.PORT_NOT_ALLOWED, "report"),
    ("report", "plain.example", 22, Verdict.DENY, Reason.DENIED_BY_RULE, "report"),
    ("report", "other.example", 443, Verdict.REPORT, Reason.NO_MATCHING_RULE, "report"),
]


@pytest.mark.parametrize(("mode", "host", "port", "verdict", "reason", "applied"), RULE_MODE_CASES)
def test_a_rules_own_mode_decides_the_refusals_it_is_responsible_for(
    tmp_path: Path,
    mode: str,
    host: str,
    port: int,
    verdict: Verdict,
    reason: Reason,
    applied: str,
) -> None:
    path = tmp_path / "modes.yaml"
    path.write_text(RULE_MODES.format(mode=mode))
    decision = decide(Request(Kind.CONNECT, host, port), load_policy(path))
    assert (decision.decision, decision.reason, decision.mode) == (verdict, reason, applied)


def test_a_rule_in_report_mode_never_relaxes_safety_refusals(tmp_path: Path) -> None:
    path = tmp_path / "modes.yaml"
    path.write_text(RULE_MODES.format(mode="enforce"))
    policy = load_policy(path)
    for sni, reason in (("evil.example", Reason.SNI_MISMATCH), (None, Reason.SNI_MISSING)):
        decision = decide(Request(Kind.TLS, "learn.example", 443, sni=sni), policy)
        assert (decision.decision, decision.reason) == (Verdict.DENY, reason)


def test_explicit_deny_rule_holds_in_report_mode_and_says_so(tmp_path: Path) -> None:
    report = make_policy(tmp_path, mode="report")
    decision = decide(Request(Kind.CONNECT, "github.com", 22), report)
    assert (decision.decision, decision.reason, decision.mode) == (
        Verdict.DENY,
        Reason.DENIED_BY_RULE,
        "report",
    )
    assert decision.detail is not None and "enforced in report mode" in decision.detail


# --- decision contents -----------------------------------------------------------------------------


def test_decision_copies_request_fields(policy: Policy) -> None:
    request = Request(
        Kind.HTTP,
        "PyPI.org",
        443,
        method="GET",
        path="/simple/",
        sni=None,
        client="10.0.0.2:5555",
        sandbox_id="sb-1",
        qtype=None,
    )
    decision = decide(request, policy)
    assert decision.kind is Kind.HTTP
    assert (decision.host, decision.port, decision.method, decision.path) == (
        "pypi.org",
        443,
        "GET",
        "/simple/",
    )
    assert (decision.client, decision.sandbox_id) == ("10.0.0.2:5555", "sb-1")
    assert decision.policy_version == policy.version
    assert decision.mode == "enforce"
    assert decision.address is None
    assert len(decision.id) == 32


DETAILS = [
    ("pypi.org", 22, "pypi.org:22 matches rule 'pypi' but the rule allows port 443"),
    (
        "deb.debian.org",
        21,
        "deb.debian.org:21 matches rule 'apt' but the rule allows ports 80, 443",
    ),
    ("github.com", 22, "github.com:22 is denied by rule 'no-ssh'"),
    ("example.net", 443, "no rule allows host example.net:443"),
    ("198.51.100.1", 443, "no rule allows address 198.51.100.1:443"),
    ("[2001:DB8:9::1]", 443, "no rule allows address [2001:db8:9::1]:443"),
    ("pypi.org", 443, "pypi.org:443 allowed by rule 'pypi'"),
]


@pytest.mark.parametrize(("host", "port", "start"), DETAILS)
def test_detail_says_what_to_do(policy: Policy, host: str, port: int, start: str) -> None:
    detail = decide(Request(Kind.CONNECT, host, port), policy).detail
    assert detail is not None and detail.startswith(start)


def test_decide_is_pure(policy: Policy) -> None:
    request = Request(Kind.CONNECT, "a.b.tree.example", 443)
    first, second = decide(request, policy), decide(request, policy)
    strip = {"id", "ts"}
    assert {k: v for k, v in first.to_dict().items() if k not in strip} == {
        k: v for k, v in second.to_dict().items() if k not in strip
    }
    assert first.id != second.id


# --- refuse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "report"])
def test_refuse_always_denies(tmp_path: Path, mode: str | None) -> None:
    policy = make_policy(tmp_path, mode=mode)
    request = Request(Kind.TLS, "PyPI.org", 443, sni="pypi.org", client="c")
    decision = refuse(request, policy, Reason.ECH_REFUSED, "ClientHello carries ECH")
    assert decision.decision is Verdict.DENY
    assert (decision.reason, decision.rule, decision.detail) == (
        Reason.ECH_REFUSED,
        None,
        "ClientHello carries ECH",
    )
    assert (decision.host, decision.sni, decision.client) == ("pypi.org", "pypi.org", "c")
    assert decision.policy_version == policy.version
    named = refuse(request, policy, Reason.NOT_TLS, "plain bytes", rule="pypi")
    assert named.rule == "pypi" and named.decision is Verdict.DENY


def test_refuse_renders_an_invalid_host(policy: Policy) -> None:
    decision = refuse(Request(Kind.HTTP, "a\nb", 80), policy, Reason.HOST_MISMATCH, "Host differs")
    assert decision.host == "a\\x0ab"


ASK_POLICY = """
version: 1
rules:
  - name: apis
    action: ask
    hosts: ["**.api.test"]
  - name: open-api
    hosts: [open.api.test]
  - name: blocked
    action: deny
    hosts: [blocked.api.test]
  - name: asked-first
    action: ask
    hosts: [both.test]
  - name: allowed-second
    hosts: [both.test]
"""


@pytest.mark.parametrize("mode", [None, "report"])
@pytest.mark.parametrize(
    ("host", "port", "verdict", "reason", "rule"),
    [
        ("x.api.test", 443, Verdict.ASK, Reason.APPROVAL_PENDING, "apis"),
        ("api.test", 443, Verdict.ASK, Reason.APPROVAL_PENDING, "apis"),
        ("open.api.test", 443, Verdict.ALLOW, Reason.ALLOWED_BY_RULE, "open-api"),
        ("blocked.api.test", 443, Verdict.DENY, Reason.DENIED_BY_RULE, "blocked"),
        ("both.test", 443, Verdict.ASK, Reason.APPROVAL_PENDING, "asked-first"),
    ],
)
def test_ask_rules_ask_where_they_are_the_most_specific_match(
    tmp_path: Path,
    mode: str | None,
    host: str,
    port: int,
    verdict: Verdict,
    reason: Reason,
    rule: str,
) -> None:
    policy = make_policy(tmp_path, ASK_POLICY, mode)
    decision = decide(Request(Kind.CONNECT, host, port), policy)
    assert (decision.decision, decision.reason, decision.rule) == (verdict, reason, rule)


def test_an_ask_is_never_enforceable_as_it_stands(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, ASK_POLICY)
    for kind, port in ((Kind.CONNECT, 443), (Kind.HTTP, 443), (Kind.DNS, None)):
        decision = decide(Request(kind, "x.api.test", port), policy)
        assert decision.decision is Verdict.ASK
        assert not decision.allowed
    wrong_port = decide(Request(Kind.CONNECT, "x.api.test", 8443), policy)
    assert (wrong_port.decision, wrong_port.reason) == (Verdict.DENY, Reason.PORT_NOT_ALLOWED)
