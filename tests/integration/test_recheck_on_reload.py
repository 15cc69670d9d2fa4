"""``--recheck-on-reload`` on a real gate: a relayed TLS tunnel the reloaded policy no longer allows is
closed and recorded; one it still allows keeps running; without recheck nothing is closed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Kind, Reason, Verdict
from proxy.core.recheck import recheck
from proxy.policy.loader import load_policy
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import WAIT, LocalCA, RunningGate, Upstream, client_hello, serving

RULES = "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"


def rule(name: str, host: str, port: int) -> str:
    return f"  - name: {name}\n    hosts: [{host}]\n    ports: [{port}]\n"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"), ["kept.test", "dropped.test", "insp.test"])


@pytest.fixture(scope="module")
def upstream(ca: LocalCA) -> Iterator[Upstream]:
    yield from serving(Upstream("tls", tls=ca.server_context()))


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("kept.test", "dropped.test", "insp.test")


def open_tunnel(gate: RunningGate, ca: LocalCA | Path, host: str, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    context = ssl.create_default_context(cafile=str(ca if isinstance(ca, Path) else ca.ca_path))
    context.set_alpn_protocols(["http/1.1"])
    tls = context.wrap_socket(raw, server_hostname=host)
    assert get(tls, host) == 200
    return tls


def get(tls: ssl.SSLSocket, host: str) -> int:
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = tls.recv(65536)
    return int(data.split(b" ", 2)[1]) if data else 0


def closed(tls: ssl.SSLSocket) -> bool:
    """The gate ended the connection: reading reaches EOF or an error (a live one keeps answering
    and then idles until the timeout)."""
    tls.settimeout(3.0)
    try:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(100):  # bounded: leftovers of earlier responses, then EOF
            if tls.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True
    return False


def run_recheck(gate: RunningGate) -> list[object]:
    async def go() -> list[object]:
        checkpoint = gate.gate.checkpoint
        return list(recheck(checkpoint.connections, checkpoint.policy_for, checkpoint.emitter.emit))

    assert gate._loop is not None
    return asyncio.run_coroutine_threadsafe(go(), gate._loop).result(WAIT)


def test_recheck_closes_only_the_tunnels_the_new_policy_refuses(
    tmp_path: Path, ca: LocalCA, upstream: Upstream, dns: FakeDns
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        RULES
        + rule("kept", "kept.test", upstream.port)
        + rule("gone", "dropped.test", upstream.port)
    )
    gate = RunningGate(path, [dns.nameserver]).start()
    try:
        kept = open_tunnel(gate, ca, "kept.test", upstream.port)
        dropped = open_tunnel(gate, ca, "dropped.test", upstream.port)
        path.write_text(RULES + rule("kept", "kept.test", upstream.port))
        gate.policy = load_policy(path)  # what a reload installs
        before = len(gate.decisions)
        closures = run_recheck(gate)
        assert len(closures) == 1
        fresh = gate.decisions[before:]
        assert [(d.decision, d.host, d.kind) for d in fresh] == [
            (Verdict.DENY, "dropped.test", Kind.CONNECT)
        ]
        assert fresh[0].detail is not None and "closed after a policy reload" in fresh[0].detail
        assert fresh[0].policy_version == gate.policy.version
        assert closed(dropped)
        assert get(kept, "kept.test") == 200  # the tunnel still allowed keeps running
        kept.close()
    finally:
        gate.stop()


def test_recheck_closes_a_tunnel_whose_address_is_in_a_range_the_reload_closed(
    tmp_path: Path, ca: LocalCA, upstream: Upstream, dns: FakeDns
) -> None:
    """The host stays allowed; the range its address is in (loopback, here) is no longer opened. A
    new CONNECT is refused as internal-address, and so is the tunnel already relayed there."""
    path = tmp_path / "policy.yaml"
    path.write_text(RULES + rule("kept", "kept.test", upstream.port))
    gate = RunningGate(path, [dns.nameserver]).start()
    try:
        tunnel = open_tunnel(gate, ca, "kept.test", upstream.port)
        path.write_text("version: 1\nrules:\n" + rule("kept", "kept.test", upstream.port))
        gate.policy = load_policy(path)
        before = len(gate.decisions)
        assert len(run_recheck(gate)) == 1
        fresh = gate.decisions[before:]
        assert [(d.decision, d.reason, d.host) for d in fresh] == [
            (Verdict.DENY, Reason.INTERNAL_ADDRESS, "kept.test")
        ]
        assert closed(tunnel)
    finally:
        gate.stop()


def test_without_recheck_admitted_tunnels_keep_running(
    tmp_path: Path, ca: LocalCA, upstream: Upstream, dns: FakeDns
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(RULES + rule("gone", "dropped.test", upstream.port))
    gate = RunningGate(path, [dns.nameserver]).start()
    try:
        tunnel = open_tunnel(gate, ca, "dropped.test", upstream.port)
        path.write_text(RULES + rule("other", "kept.test", upstream.port))
        gate.policy = load_policy(path)
        assert get(tunnel, "dropped.test") == 200
        tunnel.close()
    finally:
        gate.stop()


def test_recheck_closes_an_inspected_tunnel_too(
    tmp_path: Path, ca: LocalCA, upstream: Upstream, dns: FakeDns
) -> None:
    path = tmp_path / "policy.yaml"
    inspected = (
        f"  - name: insp\n    hosts: [insp.test]\n    ports: [{upstream.port}]\n    inspect: true\n"
    )
    path.write_text(RULES + inspected)
    confdir = tmp_path / "state"
    gate = RunningGate(
        path,
        [dns.nameserver],
        config={"confdir": str(confdir), "upstream_ca": str(ca.ca_path)},
    ).start()
    try:
        tunnel = open_tunnel(gate, confdir / "mitmproxy-ca-cert.pem", "insp.test", upstream.port)
        path.write_text(RULES + rule("other", "kept.test", upstream.port))
        gate.policy = load_policy(path)
        before = len(gate.decisions)
        assert len(run_recheck(gate)) == 1
        fresh = gate.decisions[before:]
        assert [(d.decision, d.host) for d in fresh] == [(Verdict.DENY, "insp.test")]
        assert closed(tunnel)
    finally:
        gate.stop()


def test_recheck_closes_a_tunnel_whose_rule_is_now_bound_to_executables(
    tmp_path: Path, ca: LocalCA, upstream: Upstream, dns: FakeDns
) -> None:
    """A gate that cannot see processes refuses every connection a bound rule matches; a reload
    that binds the rule of an open tunnel closes it too, and nothing more reaches the upstream."""
    path = tmp_path / "policy.yaml"
    path.write_text(RULES + rule("kept", "kept.test", upstream.port))
    gate = RunningGate(path, [dns.nameserver]).start()
    try:
        tunnel = open_tunnel(gate, ca, "kept.test", upstream.port)
        path.write_text(
            RULES + rule("kept", "kept.test", upstream.port) + "    executables: [/usr/bin/git]\n"
        )
        gate.policy = load_policy(path)
        before = len(gate.decisions)
        assert len(run_recheck(gate)) == 1
        fresh = gate.decisions[before:]
        assert [(d.decision, d.reason) for d in fresh] == [
            (Verdict.DENY, Reason.PROCESS_UNATTRIBUTED)
        ]
        requests = len(upstream.requests)
        assert closed(tunnel)
        assert len(upstream.requests) == requests
    finally:
        gate.stop()


def test_recheck_closes_a_tunnel_still_waiting_for_its_first_bytes(
    tmp_path: Path, ca: LocalCA, upstream: Upstream, dns: FakeDns
) -> None:
    """A tunnel admitted before the reload whose client has not yet sent its ClientHello is
    rechecked too: the reload binds its rule to executables, and nothing reaches the upstream when
    the ClientHello comes (decided alone, it names an allowed host)."""
    path = tmp_path / "policy.yaml"
    path.write_text(RULES + rule("kept", "kept.test", upstream.port))
    gate = RunningGate(path, [dns.nameserver]).start()
    try:
        raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        host = f"kept.test:{upstream.port}"
        raw.sendall(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        accepted = upstream.accepted
        path.write_text(
            RULES + rule("kept", "kept.test", upstream.port) + "    executables: [/usr/bin/git]\n"
        )
        gate.policy = load_policy(path)
        assert len(run_recheck(gate)) == 1
        raw.settimeout(3.0)
        with contextlib.suppress(OSError):
            raw.sendall(client_hello("kept.test"))
        try:
            rest = raw.recv(4096)
        except OSError:
            rest = b""
        assert rest == b""
        assert upstream.accepted == accepted
        raw.close()
    finally:
        gate.stop()
