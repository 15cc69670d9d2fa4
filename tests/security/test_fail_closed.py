"""Threat class 14: nothing that breaks may turn enforcement off.

A broken policy edit (whatever way it is broken) keeps the running policy in force, even when the broken
file would also have widened access. A DNS upstream that is down, silent or failing yields denials, never
an allow. Report mode, the one switch meant to let traffic through, never lets safety refusals through.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from proxy.core.decision import Reason, Verdict
from proxy.policy.model import Policy
from proxy.policy.reload import PolicyHolder
from tests.dnsfake import FakeDns
from tests.harness import RunningGate, Upstream, closed_port
from tests.security import exchange, fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(60)


class HeldGate(RunningGate):
    """The real gate reading its policy from a :class:`PolicyHolder`, as ``egress serve`` does, so a
    test can reload the file and see what the running gate enforces afterwards."""

    holder: PolicyHolder

    @property  # type: ignore[override]
    def policy(self) -> Policy:
        return self.holder()

    @policy.setter
    def policy(self, value: Policy) -> None:
        self.holder = PolicyHolder(self.policy_path, value)


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.loopback("allowed.test", "evil.test")
        server.timeout("silent.test")
        server.servfail("failing.test")
        yield server


@pytest.fixture(autouse=True)
def _reset(dns: FakeDns, plain: Upstream) -> None:
    dns.reset_queries()
    plain.reset()


def _good_policy(port: int, *hosts: str) -> str:
    return (
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: allowed\n    hosts: [{', '.join(hosts)}]\n    ports: [{port}]\n"
    )


def _get(gate: RunningGate, host: str, port: int) -> int:
    authority = f"{host}:{port}"
    reply = exchange(
        gate, f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )
    return reply.status


@pytest.fixture(scope="module")
def held(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, plain: Upstream
) -> Iterator[HeldGate]:
    path = tmp_path_factory.mktemp("reload") / "policy.yaml"
    path.write_text(_good_policy(plain.port, "allowed.test"))
    gate = HeldGate(path, [dns.nameserver])
    gate.start()
    yield gate
    gate.stop()


def _broken_edits(port: int) -> dict[str, str | None]:
    widen = f"  - name: widen\n    hosts: [evil.test]\n    ports: [{port}]\n"
    base = _good_policy(port, "allowed.test")
    return {
        "yaml-syntax": base + widen + "  - name: [unclosed\n",
        "unknown-key": base + widen + "    colour: red\n",
        "unknown-top-key": base + widen + "allow_everything: true\n",
        "duplicate-rule": base + widen + widen,
        "bad-cidr": base + widen + f"  - name: c\n    cidrs: [127.0.0.1/8]\n    ports: [{port}]\n",
        "bad-port": base + widen + "  - name: p\n    hosts: [x.test]\n    ports: [0]\n",
        "public-wildcard": base
        + f"  - name: w\n    hosts: ['*.test', '*.com']\n    ports: [{port}]\n",
        "bad-mode": base.replace("version: 1\n", "version: 1\nmode: open\n") + widen,
        "wrong-version": base.replace("version: 1", "version: 2") + widen,
        "include-cycle": "version: 1\ninclude: [policy.yaml]\n" + base.split("\n", 1)[1] + widen,
        "empty": "",
        "binary": "\x00\x01\x02\xff",
        "control-char": base + widen + "# a stray BEL \x07\n",
        "deleted": None,
    }


@pytest.mark.parametrize(
    "edit",
    list(_broken_edits(1)),
    ids=str,
)
def test_broken_reload_keeps_the_running_policy(
    held: HeldGate, plain: Upstream, dns: FakeDns, edit: str
) -> None:
    path = held.policy_path
    good = path.read_text()
    version = held.policy.version
    text = _broken_edits(plain.port)[edit]
    try:
        if text is None:
            path.unlink()
        else:
            path.write_text(text, encoding="utf-8", errors="surrogateescape")
        assert held.holder.reload() is False
        assert held.policy.version == version
        before = len(held.decisions)
        assert _get(held, "evil.test", plain.port) == 403
        assert plain.accepted == 0 and dns.count("evil.test") == 0
        assert _get(held, "allowed.test", plain.port) == 200  # not narrowed either
        denied, allowed = fresh_decisions(held, before)
        assert (denied.reason, denied.policy_version) == (Reason.NO_MATCHING_RULE, version)
        assert (allowed.decision, allowed.policy_version) == (Verdict.ALLOW, version)
    finally:
        path.write_text(good)


def test_good_reload_takes_effect(held: HeldGate, plain: Upstream) -> None:
    """Control for the table above: the holder is live, so a *valid* widening does apply."""
    path = held.policy_path
    good = path.read_text()
    try:
        path.write_text(_good_policy(plain.port, "allowed.test", "evil.test"))
        assert held.holder.reload() is True
        assert _get(held, "evil.test", plain.port) == 200
    finally:
        path.write_text(good)
        assert held.holder.reload() is True
    assert _get(held, "evil.test", plain.port) == 403


# -- DNS failures ------------------------------------------------------------------------------------


def _dead_nameserver() -> str:
    """A loopback UDP port with nothing behind it (a query there is refused at once)."""
    return f"127.0.0.1:{closed_port(socket.SOCK_DGRAM)}"


def test_unreachable_dns_upstream_denies(
    tmp_path_factory: pytest.TempPathFactory, plain: Upstream
) -> None:
    gate = start_gate_with(
        tmp_path_factory.mktemp("dead-dns"),
        _good_policy(plain.port, "allowed.test"),
        _dead_nameserver(),
        resolver_kwargs={"timeout": 0.5},
    )
    try:
        for first in (
            f"CONNECT allowed.test:{plain.port} HTTP/1.1\r\n\r\n",
            f"GET http://allowed.test:{plain.port}/ HTTP/1.1\r\nHost: allowed.test:{plain.port}\r\n\r\n",
        ):
            before = len(gate.decisions)
            reply = exchange(gate, first.encode(), idle=3.0)
            assert reply.status == 403
            assert reply.header("x-egress-reason") == "dns-failure"
            (decision,) = fresh_decisions(gate, before)
            assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.DNS_FAILURE)
        assert plain.accepted == 0
    finally:
        gate.stop()


@pytest.mark.parametrize("name", ["silent.test", "failing.test", "missing.test"])
def test_dns_timeout_servfail_and_nxdomain_deny(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, plain: Upstream, name: str
) -> None:
    gate = start_gate_with(
        tmp_path_factory.mktemp("bad-dns"),
        _good_policy(plain.port, name),
        dns.nameserver,
        resolver_kwargs={"timeout": 0.3},
    )
    try:
        before = len(gate.decisions)
        reply = exchange(gate, f"CONNECT {name}:{plain.port} HTTP/1.1\r\n\r\n".encode(), idle=3.0)
        assert reply.status == 403
        (decision,) = fresh_decisions(gate, before)
        assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.DNS_FAILURE)
        assert dns.count(name) >= 1  # it did ask, and the failure became a denial
        assert plain.accepted == 0
    finally:
        gate.stop()


# -- report mode ----------------------------------------------------------------------------------


def test_report_mode_never_lets_safety_refusals_through(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, plain: Upstream
) -> None:
    gate = start_gate_with(
        tmp_path_factory.mktemp("report"),
        f"""
        version: 1
        mode: report
        rules:
          - name: every-address
            cidrs: ["0.0.0.0/0", "::/0"]
            ports: [{plain.port}, 443]
          - name: names
            hosts: [allowed.test, failing.test]
            ports: [{plain.port}]
        """,
        dns.nameserver,
    )
    try:
        cases = [
            (f"127.0.0.1:{plain.port}", Reason.INTERNAL_ADDRESS),
            ("[::ffff:169.254.169.254]:443", Reason.INTERNAL_ADDRESS),
            (f"allowed.test:{plain.port}", Reason.INTERNAL_ADDRESS),  # resolves to loopback
            (f"failing.test:{plain.port}", Reason.DNS_FAILURE),
            (f"-bad-.test:{plain.port}", Reason.INVALID_HOST),
        ]
        for authority, reason in cases:
            before = len(gate.decisions)
            reply = exchange(gate, f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode(), idle=3.0)
            assert reply.status == 403, authority
            (decision,) = fresh_decisions(gate, before)
            assert (decision.decision, decision.reason) == (Verdict.DENY, reason), authority
        assert plain.accepted == 0
    finally:
        gate.stop()
