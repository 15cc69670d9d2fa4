"""The DNS gate over real UDP and TCP sockets, with dnspython as the client and a counting upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.destinations import dnsgate
from proxy.destinations.dnsgate import DnsGate
from proxy.destinations.resolver import Resolver
from proxy.evidence.emit import AuditUnavailable, Emitter, Sink
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy
from tests.dnsfake import FakeDns
from tests.harness import wait_until

T = TypeVar("T")
WAIT = 5.0

POLICY = """\
version: 1
mode: {mode}
rules:
  - name: allowed
    hosts: ["**.allowed.test", "gone.test"]
    ports: [443]
"""


class ListSink:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def close(self) -> None:
        pass


class BrokenJournal:
    def record(self, decision: Decision) -> None:
        raise AuditUnavailable("disk full")

    def close(self) -> None:
        pass


class GateEnv:
    """A real DnsGate on pre-bound loopback sockets, its loop in a thread, upstream = FakeDns."""

    def __init__(
        self,
        fake: FakeDns,
        policy: Policy,
        write_ahead: tuple[Sink, ...] = (),
        resolver_timeout: float = WAIT,
        **gate_kwargs: Any,
    ) -> None:
        self.fake = fake
        self.sink = ListSink()
        self.emitter = Emitter([self.sink], write_ahead=write_ahead, audit_required=True)
        # Long unless a test is about a nameserver that never answers: an answer that must come
        # may come late on a loaded machine, and a question still pending is what some count.
        self.resolver = Resolver(
            [fake.nameserver], timeout=resolver_timeout, min_ttl=5, max_ttl=300
        )
        self.gate = DnsGate(lambda: policy, self.resolver, self.emitter, "sbx-1", **gate_kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        self.udp = self.run(self.gate.serve_udp(sock=udp))
        self.tcp = self.run(self.gate.serve_tcp(sock=tcp))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def query(
        self, name: str | dns.name.Name, rdtype: str, transport: str = "udp", **kw: Any
    ) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)
        if transport == "udp":
            return dns.query.udp(q, self.udp[0], port=self.udp[1], timeout=WAIT)
        return dns.query.tcp(q, self.tcp[0], port=self.tcp[1], timeout=WAIT)

    @property
    def decisions(self) -> list[Decision]:
        return list(self.sink.decisions)

    def close(self) -> None:
        if self.loop.is_closed():  # closed by its test already
            return

        async def stop() -> None:
            self.gate.close()
            await self.gate.wait_closed()
            # Upstream questions still in flight (the resolver's, shared by callers): ended here,
            # or the closed loop's tasks would be destroyed pending, which asyncio logs as an
            # error whenever the collector gets to them - during another gate's start-up in this
            # process, which mitmproxy then refuses.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def fake() -> Iterator[FakeDns]:
    with FakeDns() as server:
        yield server


@pytest.fixture
def make_env(fake: FakeDns, tmp_path: Path) -> Iterator[Callable[..., GateEnv]]:
    envs: list[GateEnv] = []

    def make(mode: str = "enforce", **kwargs: Any) -> GateEnv:
        path = tmp_path / f"policy-{len(envs)}.yaml"
        path.write_text(textwrap.dedent(POLICY.format(mode=mode)))
        env = GateEnv(fake, load_policy(path), **kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


@pytest.fixture
def env(make_env: Callable[..., GateEnv]) -> GateEnv:
    return make_env()


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


TRANSPORTS = ["udp", "tcp"]


# --- names the policy does not allow: nothing goes upstream -------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unlisted_name_is_nxdomain_without_upstream_query(env: GateEnv, transport: str) -> None:
    name = f"{os.urandom(8).hex()}.attacker.test"
    env.fake.set(name, "A", ["203.0.113.66"])
    response = env.query(name, "A", transport)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    assert env.fake.queries == []
    d = only(env.decisions)
    assert (d.decision, d.reason, d.kind, d.host, d.qtype) == (
        Verdict.DENY,
        Reason.NO_MATCHING_RULE,
        Kind.DNS,
        name,
        "A",
    )
    assert d.sandbox_id == "sbx-1" and d.client == "127.0.0.1"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("qtype", ["TXT", "ANY", "NULL", "MX", "SRV", "NS", "SOA", "PTR", "CAA"])
@pytest.mark.parametrize("name", ["www.allowed.test", "exfil-data.attacker.test"])
def test_other_types_are_refused_without_upstream_query(
    env: GateEnv, transport: str, qtype: str, name: str
) -> None:
    env.fake.set(name, "TXT", ["secret"])
    response = env.query(name, qtype, transport)
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []
    assert env.fake.queries == []
    d = only(env.decisions)
    assert (d.decision, d.reason, d.host, d.qtype) == (
        Verdict.DENY,
        Reason.DNS_TYPE_REFUSED,
        name,
        qtype,
    )


def test_non_internet_class_is_refused(env: GateEnv) -> None:
    q = dns.message.make_query("version.bind", "TXT", rdclass=dns.rdataclass.CH)
    response = dns.query.udp(q, env.udp[0], port=env.udp[1], timeout=WAIT)
    assert response.rcode() == dns.rcode.REFUSED
    assert env.fake.queries == []
    assert only(env.decisions).reason is Reason.DNS_TYPE_REFUSED


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "labels",
    [
        [b"bad label", b"allowed", b"test"],
        [b"nul\x00", b"allowed", b"test"],
        [b"dot.inside", b"allowed", b"test"],
        [b"-lead", b"allowed", b"test"],
        [b"127", b"0", b"0", b"1"],
        [b"169", b"254", b"169", b"254"],
    ],
)
def test_invalid_names_are_refused_without_upstream_query(
    env: GateEnv, transport: str, labels: list[bytes]
) -> None:
    name = dns.name.Name([*labels, b""])
    response = env.query(name, "A", transport)
    assert response.rcode() == dns.rcode.REFUSED
    assert env.fake.queries == []
    d = only(env.decisions)
    assert (d.decision, d.reason) == (Verdict.DENY, Reason.INVALID_HOST)
    assert "\x00" not in d.host and "\n" not in d.host


def test_refusal_carries_extended_dns_error(env: GateEnv) -> None:
    response = env.query("x.attacker.test", "A", use_edns=0)
    (ede,) = [o for o in response.options if isinstance(o, dns.edns.EDEOption)]
    assert ede.code == dns.edns.EDECode.BLOCKED
    d = only(env.decisions)
    assert ede.text is not None and d.id in ede.text and "no-matching-rule" in ede.text


# --- allowed names: real answers, checked ---------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_allowed_name_gets_real_answer(env: GateEnv, transport: str) -> None:
    env.fake.set("pkg.allowed.test", "A", ["203.0.113.10", "198.51.100.10"])
    response = env.query("PKG.Allowed.Test", "A", transport)
    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response) == ["198.51.100.10", "203.0.113.10"]
    assert response.answer[0].name == dns.name.from_text("PKG.Allowed.Test")
    assert env.fake.queries == [("pkg.allowed.test", "A", "udp")]
    d = only(env.decisions)
    assert (d.decision, d.reason, d.rule, d.host, d.qtype) == (
        Verdict.ALLOW,
        Reason.ALLOWED_BY_RULE,
        "allowed",
        "pkg.allowed.test",
        "A",
    )


def test_aaaa_answer(env: GateEnv) -> None:
    env.fake.set("v6.allowed.test", "AAAA", ["2001:db8::1"])
    response = env.query("v6.allowed.test", "AAAA")
    assert addresses(response) == ["2001:db8::1"]
    assert env.fake.queries == [("v6.allowed.test", "AAAA", "udp")]


def test_cname_chain_is_flattened_to_addresses(env: GateEnv) -> None:
    env.fake.set("cdn.allowed.test", "CNAME", ["edge.elsewhere.test."])
    env.fake.set("edge.elsewhere.test", "A", ["203.0.113.20"])
    response = env.query("cdn.allowed.test", "A")
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.A]
    assert addresses(response) == ["203.0.113.20"]
    assert "elsewhere" not in response.to_text()


def test_internal_answers_are_stripped(env: GateEnv) -> None:
    env.fake.set("mixed.allowed.test", "A", ["10.0.0.1", "203.0.113.10", "169.254.169.254"])
    response = env.query("mixed.allowed.test", "A")
    assert addresses(response) == ["203.0.113.10"]
    d = only(env.decisions)
    assert d.decision is Verdict.ALLOW
    assert d.detail is not None and "10.0.0.1" in d.detail and "169.254.169.254" in d.detail


@pytest.mark.parametrize(
    ("rdtype", "values"),
    [
        ("A", ["127.0.0.1"]),
        ("A", ["169.254.169.254", "10.1.1.1"]),
        ("AAAA", ["64:ff9b::a9fe:a9fe"]),  # NAT64 of the metadata address
        ("AAAA", ["2002:7f00:1::1"]),  # 6to4 of loopback
        ("AAAA", ["::ffff:127.0.0.1", "fd00:ec2::254"]),
    ],
)
def test_all_internal_is_empty_answer_and_deny(
    env: GateEnv, rdtype: str, values: list[str]
) -> None:
    env.fake.set("inside.allowed.test", rdtype, values)
    response = env.query("inside.allowed.test", rdtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    d = only(env.decisions)
    assert (d.decision, d.reason) == (Verdict.DENY, Reason.INTERNAL_ADDRESS)
    assert d.address in values


def test_cname_into_internal_is_denied(env: GateEnv) -> None:
    env.fake.set("web.allowed.test", "CNAME", ["db.corp.test."])
    env.fake.set("db.corp.test", "A", ["192.168.10.5"])
    response = env.query("web.allowed.test", "A")
    assert response.answer == []
    assert only(env.decisions).reason is Reason.INTERNAL_ADDRESS


def test_allowed_name_that_does_not_exist_is_nxdomain(env: GateEnv) -> None:
    response = env.query("gone.test", "A")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert env.fake.count("gone.test") == 1
    assert only(env.decisions).decision is Verdict.ALLOW


@pytest.mark.parametrize("qtype", ["HTTPS", "SVCB", "CNAME"])
def test_https_svcb_cname_are_answered_empty_without_upstream(env: GateEnv, qtype: str) -> None:
    env.fake.set("svc.allowed.test", "HTTPS", ['1 . alpn="h2" ech="AEX+DQBB"'])
    env.fake.set("svc.allowed.test", "CNAME", ["elsewhere.test."])
    response = env.query("svc.allowed.test", qtype)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert env.fake.queries == []
    d = only(env.decisions)
    assert (d.decision, d.qtype) == (Verdict.ALLOW, qtype)


def test_https_for_unlisted_name_is_nxdomain(env: GateEnv) -> None:
    response = env.query("x.attacker.test", "HTTPS")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert env.fake.queries == []


@pytest.mark.parametrize(("upstream_ttl", "expected"), [(0, 5), (60, 60), (86400, 300)])
def test_ttl_is_clamped(env: GateEnv, upstream_ttl: int, expected: int) -> None:
    env.fake.set("ttl.allowed.test", "A", ["203.0.113.3"], ttl=upstream_ttl)
    response = env.query("ttl.allowed.test", "A")
    assert response.answer[0].ttl == expected


# --- upstream failures: deny, never allow --------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("failure", ["timeout", "servfail"])
def test_upstream_failure_is_servfail_and_deny(
    make_env: Callable[..., GateEnv], transport: str, failure: str
) -> None:
    env = make_env(resolver_timeout=0.5)  # a nameserver that never answers: given up on soon
    getattr(env.fake, failure)("down.allowed.test")
    response = env.query("down.allowed.test", "A", transport)
    assert response.rcode() == dns.rcode.SERVFAIL
    assert response.answer == []
    d = only(env.decisions)
    assert (d.decision, d.reason, d.rule) == (Verdict.DENY, Reason.DNS_FAILURE, "allowed")
    assert env.fake.count("down.allowed.test") >= 1


def test_audit_unavailable_withholds_the_answer(make_env: Callable[..., GateEnv]) -> None:
    env = make_env(write_ahead=(BrokenJournal(),))
    env.fake.set("pkg.allowed.test", "A", ["203.0.113.10"])
    response = env.query("pkg.allowed.test", "A")
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == []
    assert only(env.decisions).reason is Reason.AUDIT_UNAVAILABLE


# --- report mode learns names but keeps the safety refusals -------------------------------------


def test_report_mode_answers_unlisted_names_but_still_refuses_types_and_internal(
    make_env: Callable[..., GateEnv],
) -> None:
    env = make_env(mode="report")
    env.fake.set("new.attacker.test", "A", ["203.0.113.77"])
    env.fake.set("meta.attacker.test", "A", ["169.254.169.254"])
    assert addresses(env.query("new.attacker.test", "A")) == ["203.0.113.77"]
    assert env.query("new.attacker.test", "TXT").rcode() == dns.rcode.REFUSED
    assert env.query("meta.attacker.test", "A").answer == []
    verdicts = [(d.decision, d.reason) for d in env.decisions]
    assert verdicts == [
        (Verdict.REPORT, Reason.NO_MATCHING_RULE),
        (Verdict.DENY, Reason.DNS_TYPE_REFUSED),
        (Verdict.DENY, Reason.INTERNAL_ADDRESS),
    ]
    assert ("new.attacker.test", "TXT", "udp") not in env.fake.queries


# --- transport details ---------------------------------------------------------------------------


def test_several_queries_on_one_tcp_connection(env: GateEnv) -> None:
    env.fake.set("a.allowed.test", "A", ["203.0.113.1"])
    env.fake.set("b.allowed.test", "A", ["203.0.113.2"])
    with socket.create_connection(env.tcp, timeout=WAIT) as sock:
        for name, want in [("a.allowed.test", "203.0.113.1"), ("b.allowed.test", "203.0.113.2")]:
            q = dns.message.make_query(name, "A")
            assert addresses(dns.query.tcp(q, env.tcp[0], timeout=WAIT, sock=sock)) == [want]
        q = dns.message.make_query("evil.attacker.test", "A")
        assert dns.query.tcp(q, env.tcp[0], timeout=WAIT, sock=sock).rcode() == dns.rcode.NXDOMAIN
    assert len(env.decisions) == 3


def test_tcp_idle_connection_is_closed(make_env: Callable[..., GateEnv]) -> None:
    env = make_env(tcp_idle_timeout=0.3)
    with socket.create_connection(env.tcp, timeout=WAIT) as sock:
        assert sock.recv(1) == b""  # closed by the gate, not by our timeout


def test_oversized_tcp_frame_closes_connection(env: GateEnv) -> None:
    with socket.create_connection(env.tcp, timeout=WAIT) as sock:
        sock.sendall(b"\xff\xff" + b"\x00" * 100)
        assert sock.recv(1) == b""
    assert env.decisions == []


def test_tcp_connection_limit(make_env: Callable[..., GateEnv]) -> None:
    env = make_env(max_tcp_connections=2)
    env.fake.set("a.allowed.test", "A", ["203.0.113.1"])
    held = [socket.create_connection(env.tcp, timeout=WAIT) for _ in range(2)]
    try:
        q = dns.message.make_query("a.allowed.test", "A")
        # the two held connections are registered before the third arrives
        assert addresses(dns.query.tcp(q, env.tcp[0], timeout=WAIT, sock=held[0])) == [
            "203.0.113.1"
        ]
        with socket.create_connection(env.tcp, timeout=WAIT) as extra:
            assert extra.recv(1) == b""
    finally:
        for sock in held:
            sock.close()


def test_large_udp_answer_is_truncated_and_complete_over_tcp(
    make_env: Callable[..., GateEnv],
) -> None:
    env = make_env(max_answers=40)
    many = [f"2001:db8::{i:x}" for i in range(1, 31)]
    env.fake.set("big.allowed.test", "AAAA", many)
    udp = env.query("big.allowed.test", "AAAA")
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    tcp = env.query("big.allowed.test", "AAAA", "tcp")
    assert len(addresses(tcp)) == 30


def test_malformed_query_gets_formerr_and_no_upstream(env: GateEnv) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT)
        sock.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff", env.udp)
        reply = dns.message.from_wire(sock.recv(4096))
        assert reply.id == 0x1234 and reply.rcode() == dns.rcode.FORMERR
        sock.sendto(b"\x00\x01junk", env.udp)  # too short for a header: dropped
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    assert env.fake.queries == []
    assert env.decisions == []


def test_responses_are_not_answered(env: GateEnv) -> None:
    q = dns.message.make_query("a.allowed.test", "A")
    q.flags |= dns.flags.QR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(q.to_wire(), env.udp)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
    assert env.fake.queries == []


def test_two_questions_are_formerr(env: GateEnv) -> None:
    q = dns.message.make_query("a.allowed.test", "A")
    q.question.append(dns.message.make_query("x.attacker.test", "A").question[0])
    response = dns.query.udp(q, env.udp[0], port=env.udp[1], timeout=WAIT)
    assert response.rcode() == dns.rcode.FORMERR
    assert env.fake.queries == []


def _padded_query(records: int) -> bytes:
    """A query for a 253-character name followed by ``records`` additional A records, each named
    by a two-byte pointer to the question's name: 4 KiB that would cost a reader of every record
    hundreds of times a query's work."""
    name = b"\x01a" * 126 + b"\x00"
    rrs = b"".join(
        b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 0, 4) + struct.pack(">I", i)
        for i in range(records)
    )
    header = struct.pack(">HHHHHH", 0x4321, 0x0100, 1, 0, 0, records)
    return header + name + struct.pack(">HH", 1, 1) + rrs


def test_a_query_padded_with_records_is_formerr_unread(
    env: GateEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query is one question and at most EDNS's OPT record: one that counts more is refused
    from its header, before any record of it is read."""
    parsed: list[bytes] = []
    real = dns.message.from_wire

    def counted(wire: bytes, *args: Any, **kwargs: Any) -> dns.message.Message:
        parsed.append(wire)
        return real(wire, *args, **kwargs)

    monkeypatch.setattr(dns.message, "from_wire", counted)
    wire = _padded_query(230)
    assert len(wire) <= 4096
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT)
        sock.sendto(wire, env.udp)
        reply = real(sock.recv(4096))
    assert reply.id == 0x4321 and reply.rcode() == dns.rcode.FORMERR
    assert wire not in parsed
    assert env.fake.queries == [] and env.decisions == []
    # EDNS (one OPT record) is still a query
    env.fake.set("a.allowed.test", "A", ["203.0.113.10"])
    q = dns.message.make_query("a.allowed.test", "A", use_edns=0)
    assert dns.query.udp(q, env.udp[0], port=env.udp[1], timeout=WAIT).rcode() == dns.rcode.NOERROR


def test_serve_on_host_and_port(fake: FakeDns, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(mode="enforce"))
    policy = load_policy(path)
    sink = ListSink()
    fake.set("h.allowed.test", "A", ["203.0.113.4"])

    async def main() -> tuple[list[str], list[str]]:
        gate = DnsGate(lambda: policy, Resolver([fake.nameserver], timeout=0.5), Emitter([sink]))
        udp = await gate.serve_udp(host="127.0.0.1", port=0)
        tcp = await gate.serve_tcp(host="127.0.0.1", port=0)
        try:
            q = dns.message.make_query("h.allowed.test", "A")
            r1 = await dns.asyncquery.udp(q, udp[0], port=udp[1], timeout=WAIT)
            r2 = await dns.asyncquery.tcp(q, tcp[0], port=tcp[1], timeout=WAIT)
            return addresses(r1), addresses(r2)
        finally:
            gate.close()
            await gate.wait_closed()

    assert asyncio.run(main()) == (["203.0.113.4"], ["203.0.113.4"])
    assert len(sink.decisions) == 2


def test_policy_is_read_per_query(fake: FakeDns, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(mode="enforce"))
    allow = load_policy(path)
    path.write_text("version: 1\nrules: []\n")
    deny_all = load_policy(path)
    current = [allow]
    sink = ListSink()
    fake.set("r.allowed.test", "A", ["203.0.113.4"])

    async def main() -> list[int]:
        gate = DnsGate(lambda: current[0], Resolver([fake.nameserver]), Emitter([sink]))
        wire = dns.message.make_query("r.allowed.test", "A").to_wire()
        rcodes: list[int] = []
        for policy in (allow, deny_all):
            current[0] = policy
            reply = await gate.handle(wire, "10.9.9.9", "udp")
            assert reply is not None
            rcodes.append(dns.message.from_wire(reply).rcode())
        return rcodes

    assert asyncio.run(main()) == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
    assert [d.client for d in sink.decisions] == ["10.9.9.9", "10.9.9.9"]
    assert fake.count("r.allowed.test") == 1


def test_a_name_under_an_ask_rule_is_not_answered_before_anyone_said_yes(
    fake: FakeDns, tmp_path: Path
) -> None:
    """An unanswered ask is not an allow: no upstream query (no DNS channel out under a wildcard
    ask rule), REFUSED, and the ask recorded as the decision."""
    path = tmp_path / "ask.yaml"
    path.write_text(
        "version: 1\nrules:\n  - name: asked\n    action: ask\n    hosts: ['**.asked.test']\n"
    )
    fake.set("data-123.asked.test", "A", ["203.0.113.5"])
    env = GateEnv(fake, load_policy(path))
    try:
        response = env.query("data-123.asked.test", "A")
        assert response.rcode() == dns.rcode.REFUSED
        assert fake.queries == []
        decision = only(env.decisions)
        assert (decision.decision, decision.rule) == (Verdict.ASK, "asked")
    finally:
        env.close()


def test_when_dnspython_cannot_be_imported_no_query_is_answered(
    make_env: Callable[..., GateEnv], fake: FakeDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answering side is imported at the first query; if that fails, the gate answers nothing
    (the client times out: never an unchecked answer), asks nothing upstream and records a
    refusal without a name (the query could not be read). Once the import works, the next query
    is answered."""
    from proxy.destinations import dnsgate
    from proxy.runtime.lazy import LazyImport

    fake.set("pypi.allowed.test", "A", ["93.184.216.34"])
    monkeypatch.setattr(dnsgate, "ANSWERS", LazyImport("proxy.destinations.no_such"))
    env = make_env()
    query = dns.message.make_query("pypi.allowed.test", "A")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(query, env.udp[0], port=env.udp[1], timeout=1.0)
    assert fake.count() == 0
    [refusal] = env.decisions
    assert (refusal.decision, refusal.reason, refusal.kind) == (
        Verdict.DENY,
        Reason.DNS_FAILURE,
        Kind.DNS,
    )
    assert refusal.host == "" and "could not load its DNS parser" in (refusal.detail or "")
    monkeypatch.setattr(dnsgate, "ANSWERS", LazyImport("proxy.destinations.dnsanswer"))
    answer = env.query("pypi.allowed.test", "A")
    assert [r.to_text() for rrset in answer.answer for r in rrset] == ["93.184.216.34"]


def _full_gate(tmp_path: Path) -> DnsGate:
    """A DNS gate whose in-flight cap is 0: every datagram is dropped for the cap."""
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(mode="enforce"))
    policy = load_policy(path)
    return DnsGate(lambda: policy, Resolver(["127.0.0.1"]), Emitter([ListSink()]), max_inflight=0)


def test_a_flood_past_the_in_flight_cap_is_logged_once_a_second_not_per_query(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each datagram dropped for the cap used to log a line: a sandbox flooding the gate with
    queries flooded the launcher's terminal with ~1,000 lines a second."""
    monkeypatch.setattr(dnsgate, "WARN_INTERVAL", 3600.0)  # the flood never outlasts it
    gate = _full_gate(tmp_path)

    async def flood() -> None:
        for _ in range(1000):
            gate._datagram(None, b"query", ("127.0.0.1", 5353))  # type: ignore[arg-type]

    with caplog.at_level("WARNING", logger="proxy.destinations.dnsgate"):
        asyncio.run(flood())
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "dropped 1 " in warnings[0]


def test_what_a_flood_dropped_since_the_last_warning_is_said_when_the_gate_closes(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warning says the first drop at once and the rest at most once a second: a flood that
    ends within the second has the rest said when the DNS gate closes, not never."""
    monkeypatch.setattr(dnsgate, "WARN_INTERVAL", 3600.0)
    gate = _full_gate(tmp_path)

    async def flood() -> None:
        for _ in range(244):
            gate._datagram(None, b"query", ("127.0.0.1", 5353))  # type: ignore[arg-type]
        gate.close()

    with caplog.at_level("WARNING", logger="proxy.destinations.dnsgate"):
        asyncio.run(flood())
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "dropped 1 " in warnings[0] and "dropped 243 more" in warnings[1]


def test_one_tcp_connections_pipelined_queries_do_not_hold_the_gate(
    make_env: Callable[..., GateEnv],
) -> None:
    """Queries already buffered are read without a wait and a refused name waits for no upstream:
    without a turn of the loop every few of them, one connection's pipelined queries would all be
    answered before another client's (every sandbox of a shared gate stalled for seconds). The
    loop is held while the flood is written, so all of it is buffered when the gate reads. (The
    rate limit is off: it would end this flood before the turns are seen; its own tests follow.)"""
    env = make_env(queries_per_second=0)
    count = 4000
    wire = b"".join(
        len(q).to_bytes(2, "big") + q
        for q in (
            dns.message.make_query(f"q{i}.attacker.test", "A").to_wire() for i in range(count)
        )
    )
    flooding = socket.create_connection(env.tcp[:2], timeout=WAIT)
    answers = [0]
    first = threading.Event()

    def read() -> None:
        got = b""
        with contextlib.suppress(OSError):
            while chunk := flooding.recv(1 << 16):
                got += chunk
                while len(got) >= 2 and len(got) >= 2 + int.from_bytes(got[:2], "big"):
                    got = got[2 + int.from_bytes(got[:2], "big") :]
                    answers[0] += 1
                    first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        env.loop.call_soon_threadsafe(time.sleep, 0.3)  # the gate reads nothing meanwhile
        flooding.sendall(wire)
        assert first.wait(WAIT), "the flood was not answered"
        probe = env.query("probe.attacker.test", "A")
        assert probe.rcode() == dns.rcode.NXDOMAIN
        hosts = [d.host for d in env.decisions]
        assert hosts.index("probe.attacker.test") < count // 2
        assert wait_until(lambda: answers[0] >= count)
        assert env.fake.queries == []
    finally:
        with contextlib.suppress(OSError):
            flooding.shutdown(socket.SHUT_RDWR)
        reader.join(WAIT)
        flooding.close()


# --- a gate shared by many sandboxes: one client cannot hold every slot ----------------------------


def _from(address: str, kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind((address, 0))
    sock.settimeout(WAIT)
    return sock


def test_one_client_cannot_hold_every_tcp_connection_of_a_shared_gate(
    make_env: Callable[..., GateEnv],
) -> None:
    """One sandbox kept the gate's 64 TCP connections open (a query every few seconds keeps each
    past the idle timeout), and every other sandbox's DNS over TCP was closed unanswered."""
    env = make_env(max_tcp_connections=4, max_tcp_per_client=2)
    env.fake.set("a.allowed.test", "A", ["203.0.113.1"])
    q = dns.message.make_query("a.allowed.test", "A")
    held = [_from("127.0.0.2", socket.SOCK_STREAM) for _ in range(3)]
    try:
        for sock in held[:2]:
            sock.connect(env.tcp)
            assert addresses(dns.query.tcp(q, env.tcp[0], timeout=WAIT, sock=sock))
        held[2].connect(env.tcp)
        assert held[2].recv(1) == b""  # its third: over its share
        with _from("127.0.0.3", socket.SOCK_STREAM) as other:
            other.connect(env.tcp)
            answer = dns.query.tcp(q, env.tcp[0], timeout=WAIT, sock=other)
            assert addresses(answer) == ["203.0.113.1"]
    finally:
        for sock in held:
            sock.close()
    # its share comes back as its connections close
    wait_until(lambda: env.gate.in_flight() == 0, WAIT)
    with _from("127.0.0.2", socket.SOCK_STREAM) as again:
        again.connect(env.tcp)
        assert addresses(dns.query.tcp(q, env.tcp[0], timeout=WAIT, sock=again))


def test_one_client_cannot_hold_every_question_in_flight_of_a_shared_gate(
    make_env: Callable[..., GateEnv],
) -> None:
    """Questions for names that are slow to resolve (under an allowed wildcard, a name server that
    never answers) held the gate's 256 in-flight slots, and every other sandbox's were dropped."""
    env = make_env(max_inflight=4, max_inflight_per_client=2)
    env.fake.set("a.allowed.test", "A", ["203.0.113.1"])
    with _from("127.0.0.2", socket.SOCK_DGRAM) as flood:
        for i in range(6):
            env.fake.timeout(f"slow{i}.allowed.test")
            flood.sendto(dns.message.make_query(f"slow{i}.allowed.test", "A").to_wire(), env.udp)
        wait_until(lambda: env.fake.count() >= 2, WAIT)
        assert env.gate.in_flight() == 2  # its share; the rest were dropped
        with _from("127.0.0.3", socket.SOCK_DGRAM) as other:
            q = dns.message.make_query("a.allowed.test", "A")
            answer = dns.query.udp(q, env.udp[0], port=env.udp[1], timeout=WAIT, sock=other)
            assert addresses(answer) == ["203.0.113.1"]


def test_a_gate_shared_by_several_policies_answers_only_what_every_one_allows(
    fake: FakeDns, tmp_path: Path
) -> None:
    """``also``: a listener that cannot tell which sandbox asks (a DNS question has no credential)
    answers a name only where every policy allows it, and an internal address only where every
    policy opens its range; the refused name is never asked upstream."""
    wide_path, narrow_path = tmp_path / "wide.yaml", tmp_path / "narrow.yaml"
    wide_path.write_text(
        "version: 1\nallow_internal: [10.0.0.0/8]\nrules:\n"
        "  - name: wide\n    hosts: ['*.allowed.test']\n"
    )
    narrow_path.write_text("version: 1\nrules:\n  - name: one\n    hosts: [one.allowed.test]\n")
    wide, narrow = load_policy(wide_path), load_policy(narrow_path)
    sink = ListSink()
    fake.set("one.allowed.test", "A", ["10.1.2.3", "203.0.113.4"])
    fake.set("data.allowed.test", "A", ["203.0.113.5"])

    async def ask(gate: DnsGate, name: str) -> dns.message.Message:
        reply = await gate.handle(dns.message.make_query(name, "A").to_wire(), "10.9.9.9", "udp")
        assert reply is not None
        return dns.message.from_wire(reply)

    async def main() -> tuple[dns.message.Message, dns.message.Message, dns.message.Message]:
        alone = DnsGate(lambda: wide, Resolver([fake.nameserver]), Emitter([sink]))
        shared = DnsGate(
            lambda: wide, Resolver([fake.nameserver]), Emitter([sink]), also=lambda: [narrow]
        )
        return (
            await ask(alone, "one.allowed.test"),
            await ask(shared, "data.allowed.test"),
            await ask(shared, "one.allowed.test"),
        )

    control, refused, screened = asyncio.run(main())
    assert addresses(control) == ["10.1.2.3", "203.0.113.4"]  # the wide policy opens 10/8
    assert refused.rcode() == dns.rcode.NXDOMAIN
    assert fake.count("data.allowed.test") == 0
    assert addresses(screened) == ["203.0.113.4"]  # the narrow one does not
    assert sink.decisions[1].reason is Reason.NO_MATCHING_RULE


# --- the rate of questions per client ---------------------------------------------------------


def _answered(sock: socket.socket, quiet: float = 1.0) -> int:
    """Answers that reach ``sock`` until none has come for ``quiet`` seconds (bounded): call it
    once the gate has recorded every decision it will answer, so none is still to come."""
    sock.settimeout(quiet)
    got = 0
    for _ in range(10_000):
        try:
            sock.recv(4096)
        except TimeoutError:
            return got
        got += 1
    return got


def test_questions_over_the_rate_are_dropped_unasked_and_recorded_once(
    make_env: Callable[..., GateEnv], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client flooding the gate with questions (a refused name costs no upstream query but a
    decision and a record each) gets its burst answered and the rest dropped before they are
    read: nothing more goes upstream, and the drops are one ``rate-limit`` record, not one each.
    Another client is answered meanwhile. (A rate of one question in a thousand seconds: no token
    comes back while the test runs, whatever the machine's speed.)"""
    monkeypatch.setattr(dnsgate, "RECORD_INTERVAL", 3600.0)
    env = make_env(queries_per_second=0.001, queries_burst=5)
    env.fake.set("a.allowed.test", "A", ["203.0.113.1"])
    with _from("127.0.0.2", socket.SOCK_DGRAM) as flood:
        for _ in range(30):
            flood.sendto(dns.message.make_query("a.allowed.test", "A").to_wire(), env.udp)
        # each answer is sent as its decision is recorded: wait for those, then read them
        assert wait_until(lambda: len([d for d in env.decisions if d.client == "127.0.0.2"]) >= 6)
        assert _answered(flood) == 5
    assert len(env.fake.queries) <= 5
    with _from("127.0.0.3", socket.SOCK_DGRAM) as other:
        q = dns.message.make_query("a.allowed.test", "A")
        answer = dns.query.udp(q, env.udp[0], port=env.udp[1], timeout=WAIT, sock=other)
        assert addresses(answer) == ["203.0.113.1"]
    flooded = [d for d in env.decisions if d.client == "127.0.0.2"]
    limited = [d for d in flooded if d.reason is Reason.RATE_LIMIT]
    assert len(flooded) == 6 and len(limited) == 1, flooded
    assert limited[0].decision is Verdict.DENY and limited[0].kind is Kind.DNS
    assert limited[0].sandbox_id == "sbx-1" and "1 dropped" in (limited[0].detail or "")
    # what was dropped since that record is recorded as the gate closes, not lost
    env.close()
    recorded = [d for d in env.sink.decisions if d.reason is Reason.RATE_LIMIT]
    assert len(recorded) == 2 and "24 dropped" in (recorded[1].detail or "")


def test_the_last_drops_of_a_flood_are_recorded_once_it_stops(
    make_env: Callable[..., GateEnv], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only when the gate closes: a shared gate runs for weeks."""
    monkeypatch.setattr(dnsgate, "RECORD_INTERVAL", 0.2)
    env = make_env(queries_per_second=0.001, queries_burst=1)
    with _from("127.0.0.2", socket.SOCK_DGRAM) as flood:
        for i in range(10):
            flood.sendto(dns.message.make_query(f"q{i}.attacker.test", "A").to_wire(), env.udp)

        def dropped() -> int:
            counts = [
                int((d.detail or "").split(": ")[-1].split()[0])
                for d in env.decisions
                if d.reason is Reason.RATE_LIMIT
            ]
            return sum(counts)

        assert wait_until(lambda: dropped() == 9), env.decisions
    # nothing left to record: the client is forgotten an interval later
    assert wait_until(lambda: not env.gate._over)


def test_a_tcp_client_over_the_rate_is_closed_with_its_questions_unread(
    make_env: Callable[..., GateEnv],
) -> None:
    env = make_env(queries_per_second=0.001, queries_burst=3)
    wire = b"".join(
        len(q).to_bytes(2, "big") + q
        for q in (dns.message.make_query(f"q{i}.attacker.test", "A").to_wire() for i in range(10))
    )
    with _from("127.0.0.2", socket.SOCK_STREAM) as flood:
        flood.connect(env.tcp)
        flood.sendall(wire)
        got = b""
        for _ in range(100):
            chunk = flood.recv(1 << 16)
            if not chunk:
                break
            got += chunk
    answers = 0
    while len(got) >= 2:
        got = got[2 + int.from_bytes(got[:2], "big") :]
        answers += 1
    assert answers == 3
    hosts = [d.host for d in env.decisions if d.client == "127.0.0.2"]
    assert hosts == ["q0.attacker.test", "q1.attacker.test", "q2.attacker.test", ""]
    assert env.fake.queries == []


def test_no_rate_is_kept_when_it_is_off(make_env: Callable[..., GateEnv]) -> None:
    env = make_env(queries_per_second=0, queries_burst=1)
    with _from("127.0.0.2", socket.SOCK_DGRAM) as client:
        for i in range(20):
            client.sendto(dns.message.make_query(f"q{i}.attacker.test", "A").to_wire(), env.udp)
        assert wait_until(lambda: len(env.decisions) >= 20)
        assert _answered(client) == 20
    assert not [d for d in env.decisions if d.reason is Reason.RATE_LIMIT]


def test_forgetting_clients_keeps_one_flush_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More clients over the rate than are remembered: the early flush that forgets them all must
    take the pending timer with it, or each one left a timer that ran every second for good."""
    monkeypatch.setattr(dnsgate, "MAX_RECORDED_CLIENTS", 2)
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(mode="enforce"))
    policy = load_policy(path)
    sink = ListSink()
    gate = DnsGate(
        lambda: policy, Resolver(["127.0.0.1"]), Emitter([sink]), queries_per_second=0.001,
        queries_burst=1,
    )  # fmt: skip

    async def flood() -> int:
        loop = asyncio.get_running_loop()
        handles: list[asyncio.TimerHandle] = []
        real = loop.call_later

        def tracked(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
            handle = real(delay, callback, *args)
            handles.append(handle)
            return handle

        monkeypatch.setattr(loop, "call_later", tracked)
        for i in range(40):
            gate._within_rate((f"127.0.0.{2 + i % 8}", 5353))
        live = sum(not handle.cancelled() for handle in handles)
        gate.close()
        return live

    assert asyncio.run(flood()) == 1
    assert [d for d in sink.decisions if d.reason is Reason.RATE_LIMIT]
