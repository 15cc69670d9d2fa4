"""Fault drills with the real component broken: the gate keeps enforcing, refuses with the reason the
fault explains, and recovers by itself when the component comes back (threat 14)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Reason, Verdict
from tests.dnsfake import FakeDns
from tests.harness import RunningGate, Upstream, on_a_free_port, restartable_port, serving
from tests.security import exchange, fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(90)

RESOLVER = {"timeout": 0.5, "negative_ttl": 0.2, "min_ttl": 0.5, "max_ttl": 1}


@pytest.fixture
def plain() -> Iterator[Upstream]:
    yield from serving(Upstream("plain"))


def policy(port: int) -> str:
    return (
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: allowed\n    hosts: [allowed.test]\n    ports: [{port}]\n"
    )


def request(gate: RunningGate, port: int) -> tuple[int, Reason]:
    before = len(gate.decisions)
    wire = f"GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
    reply = exchange(gate, wire.encode(), idle=3.0)
    (decision,) = fresh_decisions(gate, before)
    return reply.status, decision.reason


def until_allowed(gate: RunningGate, port: int, seconds: float = 10) -> tuple[int, Reason]:
    """Recovery is bounded by the negative-cache time; poll, but never forever."""
    deadline = time.monotonic() + seconds
    result = request(gate, port)
    while result[1] is not Reason.ALLOWED_BY_RULE and time.monotonic() < deadline:
        time.sleep(0.2)
        result = request(gate, port)
    return result


def test_a_dns_upstream_answering_garbage_denies_then_recovers(
    tmp_path: Path, plain: Upstream
) -> None:
    with FakeDns() as dns:
        dns.set("allowed.test", "A", ["127.0.0.1"])
        dns.garbage()
        gate = start_gate_with(
            tmp_path, policy(plain.port), dns.nameserver, resolver_kwargs=RESOLVER
        )
        try:
            for _ in range(4):  # each kind of wrong answer in turn
                assert request(gate, plain.port) == (403, Reason.DNS_FAILURE)
            assert plain.accepted == 0
            dns.garbage(False)
            assert until_allowed(gate, plain.port) == (200, Reason.ALLOWED_BY_RULE)
            assert plain.accepted == 1
        finally:
            gate.stop()


def on_a_kept_port() -> FakeDns:
    """A nameserver on a port it can come back to once it has gone (``restartable_port``: on an
    ephemeral port, a connect's TIME_WAIT could hold it for a minute)."""
    _, server = on_a_free_port(
        lambda port: FakeDns(port=port).start(),
        20,
        pick=lambda: restartable_port(socket.SOCK_DGRAM),
    )
    return server


def test_a_dns_upstream_that_goes_away_denies_then_recovers(
    tmp_path: Path, plain: Upstream
) -> None:
    first = on_a_kept_port()
    port = first.address[1]
    first.set("allowed.test", "A", ["127.0.0.1"])
    gate = start_gate_with(tmp_path, policy(plain.port), first.nameserver, resolver_kwargs=RESOLVER)
    try:
        assert request(gate, plain.port) == (200, Reason.ALLOWED_BY_RULE)
        first.stop()
        time.sleep(1.2)  # past the positive cache's ceiling: the next lookup asks upstream
        status, reason = request(gate, plain.port)
        assert (status, reason) == (403, Reason.DNS_FAILURE)
        accepted = plain.accepted
        with FakeDns(port=port) as again:
            again.set("allowed.test", "A", ["127.0.0.1"])
            assert until_allowed(gate, plain.port) == (200, Reason.ALLOWED_BY_RULE)
        assert plain.accepted == accepted + 1
    finally:
        gate.stop()
        first.stop()


def test_denials_during_the_outage_are_recorded_as_denials(tmp_path: Path, plain: Upstream) -> None:
    with FakeDns() as dns:
        dns.garbage()
        gate = start_gate_with(
            tmp_path, policy(plain.port), dns.nameserver, resolver_kwargs=RESOLVER
        )
        try:
            before = len(gate.decisions)
            request(gate, plain.port)
            (decision,) = fresh_decisions(gate, before)
            assert decision.decision is Verdict.DENY
            assert decision.detail is not None and "allowed.test" in decision.detail
        finally:
            gate.stop()
