"""Threat class 14 at its edge: report mode lets traffic the allowlist does not cover through (to learn
what is missing), and nothing else.

A host no rule names is ``report`` and proceeds, so everything after the policy step must still hold
for it: the ClientHello must name the tunnel's host (no SNI, another SNI, ECH), the tunnel must carry
TLS, an HTTP request must name the host it is routed to, and an explicit deny rule stays a deny. These
refusals come from the adapters' classifiers through ``proxy.core.engine.refuse``; the destination and
host-name refusals are covered in ``test_fail_closed.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from proxy.core.decision import Reason, Verdict
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import RunningGate, Upstream
from tests.security import client_hello, exchange, fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(60)

ECH = struct.pack("!HH", 0xFE0D, 4) + b"\x00\x00\x01\x02"


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("unlisted.test", "other.test", "denied.test")


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, tls: Upstream, plain: Upstream
) -> Iterator[RunningGate]:
    running = start_gate_with(
        tmp_path_factory.mktemp("report-edges"),
        """
        version: 1
        mode: report
        allow_internal: [127.0.0.0/8]
        rules:
          - name: no-denied
            action: deny
            hosts: [denied.test]
        """,
        dns.nameserver,
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(tls: Upstream, plain: Upstream) -> None:
    tls.reset()
    plain.reset()


def _connect(host: str, port: int) -> bytes:
    return f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode()


def test_control_an_unlisted_host_is_reported_and_reached(gate: RunningGate, tls: Upstream) -> None:
    before = len(gate.decisions)
    reply = exchange(
        gate, _connect("unlisted.test", tls.port), client_hello("unlisted.test"), tunnel_reply=True
    )
    assert reply.tunnel_bytes()[:2] == b"\x16\x03"  # the upstream's ServerHello
    assert tls.accepted == 1
    connect, hello = fresh_decisions(gate, before)
    assert (connect.decision, connect.reason) == (Verdict.REPORT, Reason.NO_MATCHING_RULE)
    assert hello.decision is Verdict.REPORT


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (client_hello("other.test"), Reason.SNI_MISMATCH),
        (client_hello(None), Reason.SNI_MISSING),
        (client_hello("unlisted.test", ECH), Reason.ECH_REFUSED),
        (b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n", Reason.NOT_TLS),
        (b"SSH-2.0-OpenSSH_9.6\r\n", Reason.NOT_TLS),
    ],
    ids=["other-sni", "no-sni", "ech", "plain-http", "ssh"],
)
def test_a_reported_tunnel_still_gets_every_first_bytes_refusal(
    gate: RunningGate, tls: Upstream, first_bytes: bytes, reason: Reason
) -> None:
    before = len(gate.decisions)
    reply = exchange(gate, _connect("unlisted.test", tls.port), first_bytes)
    assert reply.closed
    assert reply.data == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert tls.accepted == 0 and tls.bytes_received == 0
    connect, hello = fresh_decisions(gate, before)
    assert connect.decision is Verdict.REPORT
    assert (hello.kind, hello.decision, hello.reason) == ("tls", Verdict.DENY, reason)


@pytest.mark.parametrize(
    "host_header",
    ["other.test", "unlisted.test:1", None],
    ids=["other-host", "other-port", "two-hosts"],
)
def test_a_reported_request_still_must_name_where_it_is_routed(
    gate: RunningGate, plain: Upstream, host_header: str | None
) -> None:
    authority = f"unlisted.test:{plain.port}"
    if host_header is None:
        headers = f"Host: {authority}\r\nHost: other.test\r\n"
    else:
        headers = f"Host: {host_header}\r\n"
    before = len(gate.decisions)
    reply = exchange(gate, f"GET http://{authority}/ HTTP/1.1\r\n{headers}\r\n".encode())
    assert reply.status == 403, reply.data[:200]
    assert plain.accepted == 0
    (decision,) = fresh_decisions(gate, before)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.HOST_MISMATCH)


def test_control_a_reported_request_naming_its_host_is_reached(
    gate: RunningGate, plain: Upstream
) -> None:
    authority = f"unlisted.test:{plain.port}"
    reply = exchange(
        gate, f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )
    assert reply.status == 200, reply.data[:200]
    assert plain.accepted == 1


def test_an_explicit_deny_rule_holds_in_report_mode(
    gate: RunningGate, dns: FakeDns, tls: Upstream
) -> None:
    dns.reset_queries()
    before = len(gate.decisions)
    reply = exchange(gate, _connect("denied.test", tls.port), client_hello("denied.test"))
    assert reply.status == 403
    assert tls.accepted == 0
    assert dns.count("denied.test") == 0
    (decision,) = fresh_decisions(gate, before)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.DENIED_BY_RULE)
