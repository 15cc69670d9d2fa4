"""Threat classes 1 and 2: host spellings and IP literals, through CONNECT and absolute-form URLs.

Class 1 attacks aim at a disagreement between what the gate matches and what a resolver, curl or the
upstream reads. Class 2 writes internal addresses in every spelling a C library, curl or a browser
accepts, against a policy whose ``cidrs`` allow *every* address and that has no ``allow_internal``: the
only thing between the sandbox and loopback or the metadata service is the gate's address check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Reason, Verdict
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import RunningGate, Upstream
from tests.security import client_hello, exchange, fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(60)


# -- class 1: host spelling ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns(
        "allowed.test", "evil.test", "allowed.test.evil.test", "evilallowed.test"
    )


@pytest.fixture(scope="module")
def upstream6() -> Iterator[Upstream]:
    try:
        server = Upstream("v6-upstream", host="::1")
    except OSError as exc:  # pragma: no cover - machines without IPv6 loopback
        pytest.skip(f"no IPv6 loopback: {exc}")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _reset_counters(dns: FakeDns, plain: Upstream, tls: Upstream, upstream6: Upstream) -> None:
    dns.reset_queries()
    for server in (plain, tls, upstream6):
        server.reset()


@pytest.fixture(scope="module")
def name_gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, plain: Upstream, tls: Upstream
) -> Iterator[RunningGate]:
    gate = start_gate_with(
        tmp_path_factory.mktemp("names"),
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: only-allowed
            hosts: [allowed.test]
            ports: [{plain.port}, {tls.port}]
        """,
        dns.nameserver,
    )
    yield gate
    gate.stop()


LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62])  # 254 octets: one over the limit

# (authority host, expected reason) for spellings mitmproxy parses and the gate must refuse itself.
DECIDED_SPELLINGS = [
    ("allowed.test.evil.test", Reason.NO_MATCHING_RULE),  # suffix trap
    ("evilallowed.test", Reason.NO_MATCHING_RULE),  # suffix trap without a dot
    ("xn--llowed-2nf.test", Reason.NO_MATCHING_RULE),  # homoglyph: Cyrillic a, as punycode
    ("-allowed.test", Reason.INVALID_HOST),  # leading hyphen
    ("allowed-.test", Reason.INVALID_HOST),  # trailing hyphen
    (LONG_NAME, Reason.INVALID_HOST),  # 254 octets: the gate's limit is 253
]

# Spellings mitmproxy's HTTP parser already rejects with 400 before any hook runs.
PARSER_REJECTED = [
    "allowed%2etest",  # percent-encoded dot
    "evil.test@allowed.test",  # userinfo
    "allowed.test@evil.test",
    "allowed.test\x00.evil.test",  # NUL
    "allowed.test\r.evil.test",  # lone CR
    "allowed..test",  # empty label
    "a" * 64 + ".test",  # label over 63
    ".".join(["a" * 63] * 4) + ".test",  # name over 255
    "allowed.test\x1b",  # control character
    "allowed\u0430.test",  # raw UTF-8 in the authority
    "xn--zz.test",  # punycode that does not decode
]


@pytest.mark.parametrize(("host", "reason"), DECIDED_SPELLINGS, ids=lambda v: str(v)[:24])
def test_connect_with_hostile_spelling_is_refused_before_dns(
    name_gate: RunningGate,
    dns: FakeDns,
    tls: Upstream,
    host: str,
    reason: Reason,
) -> None:
    dns.reset_queries()
    before = len(name_gate.decisions)
    reply = exchange(name_gate, f"CONNECT {host}:{tls.port} HTTP/1.1\r\n\r\n".encode())
    assert reply.status == 403, reply.data[:200]
    assert reply.header("x-egress-reason") == reason
    assert tls.accepted == 0
    assert dns.queries == []
    (decision,) = fresh_decisions(name_gate, before)
    assert (decision.kind, decision.decision, decision.reason) == ("connect", Verdict.DENY, reason)


@pytest.mark.parametrize(("host", "reason"), DECIDED_SPELLINGS, ids=lambda v: str(v)[:24])
def test_absolute_form_with_hostile_spelling_is_refused_before_dns(
    name_gate: RunningGate,
    dns: FakeDns,
    plain: Upstream,
    host: str,
    reason: Reason,
) -> None:
    dns.reset_queries()
    before = len(name_gate.decisions)
    authority = f"{host}:{plain.port}"
    reply = exchange(
        name_gate, f"GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )
    assert reply.status == 403, reply.data[:200]
    assert plain.accepted == 0
    assert dns.queries == []
    (decision,) = fresh_decisions(name_gate, before)
    assert (decision.kind, decision.decision) == ("http", Verdict.DENY)
    # The Host header carries the same bad name; whichever check sees it first may name it.
    accepted = {reason, Reason.HOST_MISMATCH} if reason is Reason.INVALID_HOST else {reason}
    assert decision.reason in accepted


@pytest.mark.parametrize("host", PARSER_REJECTED, ids=lambda v: repr(v)[:24])
def test_unparseable_authority_never_reaches_dns_or_upstream(
    name_gate: RunningGate,
    dns: FakeDns,
    plain: Upstream,
    tls: Upstream,
    host: str,
) -> None:
    """mitmproxy's parser refuses these with 400 before the gate sees them. Nothing may leak and
    nothing may be recorded as allowed. (No decision is recorded either: see docs/threats.md.)"""
    dns.reset_queries()
    before = len(name_gate.decisions)
    connect = exchange(name_gate, f"CONNECT {host}:{tls.port} HTTP/1.1\r\n\r\n".encode())
    authority = f"{host}:{plain.port}"
    absolute = exchange(name_gate, f"GET http://{authority}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    for reply in (connect, absolute):
        assert reply.status in (400, 403), reply.data[:200]
    assert tls.accepted == 0 and plain.accepted == 0
    assert dns.queries == []
    assert not [d for d in fresh_decisions(name_gate, before) if d.allowed]


def test_case_and_trailing_dot_are_one_host_and_still_pinned(
    name_gate: RunningGate, tls: Upstream
) -> None:
    """Control for the spellings above: the canonical form of a legitimate spelling is allowed, the
    decision names the canonical host, and the tunnel reaches the checked address."""
    before = len(name_gate.decisions)
    reply = exchange(
        name_gate,
        f"CONNECT ALLOWED.Test.:{tls.port} HTTP/1.1\r\n\r\n".encode(),
        client_hello("Allowed.TEST"),
        tunnel_reply=True,
    )
    assert reply.data.startswith(b"HTTP/1.1 200")
    assert reply.tunnel_bytes()[:2] == b"\x16\x03"  # the upstream's ServerHello came back
    connect, hello = fresh_decisions(name_gate, before)
    assert (connect.host, connect.decision, connect.address) == (
        "allowed.test",
        Verdict.ALLOW,
        "127.0.0.1",
    )
    assert hello.decision is Verdict.ALLOW
    assert tls.accepted == 1


# -- class 2: IP literals against a policy whose cidrs allow everything ------------------------------


@pytest.fixture(scope="module")
def everything_gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    plain: Upstream,
    upstream6: Upstream,
) -> Iterator[RunningGate]:
    gate = start_gate_with(
        tmp_path_factory.mktemp("literals"),
        f"""
        version: 1
        rules:
          - name: every-address
            cidrs: ["0.0.0.0/0", "::/0"]
            ports: [{plain.port}, {upstream6.port}, 443]
          - name: doc-range
            cidrs: [203.0.113.0/24]
            ports: [443]
        """,
        dns.nameserver,
    )
    yield gate
    gate.stop()


# (spelling as written in the authority, canonical address the decision must name)
INTERNAL_LITERALS = [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),  # decimal
    ("0x7f000001", "127.0.0.1"),  # hex
    ("0X7F000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),  # octal
    ("127.000.000.001", "127.0.0.1"),
    ("127.1", "127.0.0.1"),  # short
    ("127.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),  # mixed
    ("0", "0.0.0.0"),
    ("0.0.0.0", "0.0.0.0"),
    ("[::1]", "::1"),
    ("[::]", "::"),
    ("[::ffff:127.0.0.1]", "127.0.0.1"),  # IPv4-mapped, dotted
    ("[::ffff:7f00:1]", "127.0.0.1"),  # IPv4-mapped, hex
    ("[0:0:0:0:0:ffff:127.0.0.1]", "127.0.0.1"),
    ("[::127.0.0.1]", "::7f00:1"),  # IPv4-compatible
    ("[64:ff9b::7f00:1]", "64:ff9b::7f00:1"),  # NAT64 of loopback
    ("[2002:7f00:1::]", "2002:7f00:1::"),  # 6to4 of loopback
    ("169.254.169.254", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("[::ffff:169.254.169.254]", "169.254.169.254"),
    ("[::ffff:a9fe:a9fe]", "169.254.169.254"),
    ("[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe"),
    ("[2002:a9fe:a9fe::]", "2002:a9fe:a9fe::"),
    ("[2001::5601:5601]", "2001::5601:5601"),  # Teredo whose client is 169.254.169.254
    ("[fd00:ec2::254]", "fd00:ec2::254"),  # AWS metadata over IPv6
    ("10.0.0.1", "10.0.0.1"),
    ("100.64.0.1", "100.64.0.1"),
]


def _literal_port(spelling: str, plain: Upstream, upstream6: Upstream) -> int:
    return upstream6.port if spelling.startswith("[") else plain.port


@pytest.mark.parametrize(("spelling", "canonical"), INTERNAL_LITERALS, ids=lambda v: str(v))
def test_internal_literal_via_connect_is_refused(
    everything_gate: RunningGate,
    dns: FakeDns,
    plain: Upstream,
    upstream6: Upstream,
    spelling: str,
    canonical: str,
) -> None:
    port = _literal_port(spelling, plain, upstream6)
    before = len(everything_gate.decisions)
    reply = exchange(everything_gate, f"CONNECT {spelling}:{port} HTTP/1.1\r\n\r\n".encode())
    assert reply.status == 403, reply.data[:200]
    assert reply.header("x-egress-reason") == "internal-address"
    assert plain.accepted == 0 and upstream6.accepted == 0
    assert dns.queries == []
    (decision,) = fresh_decisions(everything_gate, before)
    assert (decision.decision, decision.reason, decision.host) == (
        Verdict.DENY,
        Reason.INTERNAL_ADDRESS,
        canonical,
    )


@pytest.mark.parametrize(("spelling", "canonical"), INTERNAL_LITERALS, ids=lambda v: str(v))
def test_internal_literal_via_absolute_url_is_refused(
    everything_gate: RunningGate,
    dns: FakeDns,
    plain: Upstream,
    upstream6: Upstream,
    spelling: str,
    canonical: str,
) -> None:
    port = _literal_port(spelling, plain, upstream6)
    before = len(everything_gate.decisions)
    authority = f"{spelling}:{port}"
    reply = exchange(
        everything_gate, f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )
    assert reply.status == 403, reply.data[:200]
    assert reply.header("x-egress-reason") == "internal-address"
    assert plain.accepted == 0 and upstream6.accepted == 0
    assert dns.queries == []
    (decision,) = fresh_decisions(everything_gate, before)
    assert (decision.decision, decision.reason, decision.host) == (
        Verdict.DENY,
        Reason.INTERNAL_ADDRESS,
        canonical,
    )


@pytest.mark.parametrize("spelling", ["[::1%lo]", "[fe80::1%25lo]", "[::ffff:127.0.0.1%1]"])
def test_ipv6_zone_ids_are_refused(
    everything_gate: RunningGate,
    plain: Upstream,
    upstream6: Upstream,
    spelling: str,
) -> None:
    before = len(everything_gate.decisions)
    reply = exchange(
        everything_gate, f"CONNECT {spelling}:{upstream6.port} HTTP/1.1\r\n\r\n".encode()
    )
    assert reply.status in (400, 403)
    assert plain.accepted == 0 and upstream6.accepted == 0
    assert all(
        d.reason == Reason.INVALID_HOST and not d.allowed
        for d in fresh_decisions(everything_gate, before)
    )


@pytest.mark.parametrize(
    "spelling", ["203.0.113.5", "3405803781", "0xcb007105", "[::ffff:203.0.113.5]", "203.0.28933"]
)
def test_documentation_range_literal_is_matched_by_cidrs_in_any_spelling(
    everything_gate: RunningGate, spelling: str
) -> None:
    """cidrs match the canonical address whatever the spelling, and documentation ranges are not
    internal: the gate's own checks let it through. The harness's loopback fence (tests never send
    packets off this machine) is then the only refusal, and it says so in its detail."""
    before = len(everything_gate.decisions)
    exchange(everything_gate, f"CONNECT {spelling}:443 HTTP/1.1\r\n\r\n".encode())
    (decision,) = fresh_decisions(everything_gate, before)
    assert (decision.host, decision.address) == ("203.0.113.5", "203.0.113.5")
    assert decision.rule in ("doc-range", "every-address")
    assert decision.reason != Reason.INTERNAL_ADDRESS
    assert decision.allowed or (decision.detail or "").startswith("test fence:")


def test_nat64_form_of_an_allowed_address_is_not_that_address(
    write_policy: Callable[[str], Path], start_gate: Callable[..., RunningGate]
) -> None:
    """A cidrs rule for 203.0.113.0/24 opens IPv4 (and IPv4-mapped, the same socket address) only;
    the NAT64 or 6to4 spelling is a different destination the policy did not list."""
    gate = start_gate(
        write_policy(
            """
            version: 1
            rules:
              - name: doc-range
                cidrs: [203.0.113.0/24]
                ports: [443]
            """
        )
    )
    for spelling in ("[64:ff9b::cb00:7105]", "[2002:cb00:7105::]", "127.0.0.1", "[::1]"):
        before = len(gate.decisions)
        reply = exchange(gate, f"CONNECT {spelling}:443 HTTP/1.1\r\n\r\n".encode())
        assert reply.status == 403, spelling
        (decision,) = fresh_decisions(gate, before)
        assert decision.reason == Reason.NO_MATCHING_RULE, spelling
