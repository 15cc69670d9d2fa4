"""Threat classes 10 (the gate's own listener reached through itself) and 13 (resource abuse).

Resource tests measure what the real gate does today under small, bounded floods (a few hundred
connections, a few MiB) and assert the property that matters on a shared gate: the limits that exist
hold, nothing reaches an upstream, and *another* client is still served promptly.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from proxy.core.decision import Reason, Verdict
from proxy.policy.loader import load_policy
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import WAIT, RunningGate, Upstream, wait_until
from tests.security import client_hello, exchange, fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test", "evil.test", "localhost", "gate.test")


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, plain: Upstream, tls: Upstream
) -> Iterator[RunningGate]:
    running = start_gate_with(
        tmp_path_factory.mktemp("resources"),
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: allowed
            hosts: [allowed.test]
            ports: [{plain.port}, {tls.port}]
        """,
        dns.nameserver,
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(dns: FakeDns, plain: Upstream, tls: Upstream) -> None:
    dns.reset_queries()
    plain.reset()
    tls.reset()


def _served_promptly(gate: RunningGate, plain: Upstream, limit: float = 3.0) -> float:
    """Another client's request still completes, and quickly; returns how long it took."""
    port = plain.port
    started = time.monotonic()
    reply = exchange(
        gate,
        f"GET http://allowed.test:{port}/probe HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n".encode(),
    )
    took = time.monotonic() - started
    assert reply.status == 200, reply.data[:200]
    assert took < limit, f"another client waited {took:.2f}s"
    return took


def _open(gate: RunningGate, first: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    sock.sendall(first)
    return sock


# -- class 10: the gate's own listener -------------------------------------------------------------


def test_own_listener_is_refused_without_allow_internal(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns
) -> None:
    directory = tmp_path_factory.mktemp("self")
    running = start_gate_with(directory, "version: 1\nrules: []\n", dns.nameserver)
    try:
        own = running.port
        widened = directory / "widened.yaml"
        widened.write_text(
            "version: 1\nrules:\n"
            f"  - name: names\n    hosts: [localhost, gate.test]\n    ports: [{own}]\n"
            f"  - name: loopback\n    cidrs: [127.0.0.0/8, '::1/128']\n    ports: [{own}]\n"
        )
        running.policy = load_policy(widened)  # a rule naming the gate's own port, as a mistake
        for target in ("127.0.0.1", "localhost", "gate.test", "[::1]", "2130706433"):
            before = len(running.decisions)
            reply = exchange(running, f"CONNECT {target}:{own} HTTP/1.1\r\n\r\n".encode())
            assert reply.status == 403, target
            (decision,) = fresh_decisions(running, before)
            assert decision.reason == Reason.INTERNAL_ADDRESS, target
            reply = exchange(
                running,
                f"GET http://{target}:{own}/ HTTP/1.1\r\nHost: {target}:{own}\r\n\r\n".encode(),
            )
            assert reply.status == 403, target
    finally:
        running.stop()


@pytest.fixture
def self_open_gate(tmp_path_factory: pytest.TempPathFactory, dns: FakeDns) -> Iterator[RunningGate]:
    """A gate whose policy opens loopback *and* names its own port: the worst operator mistake."""
    directory = tmp_path_factory.mktemp("self-open")
    running = start_gate_with(directory, "version: 1\nrules: []\n", dns.nameserver)
    own = running.port
    widened = directory / "widened.yaml"
    widened.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: names\n    hosts: [localhost, gate.test]\n    ports: [{own}]\n"
        f"  - name: loopback\n    cidrs: [127.0.0.0/8]\n    ports: [{own}]\n"
    )
    running.policy = load_policy(widened)
    yield running
    running.stop()


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost", "gate.test"])
def test_plain_http_to_own_listener_does_not_loop(self_open_gate: RunningGate, target: str) -> None:
    own = self_open_gate.port
    before = len(self_open_gate.decisions)
    reply = exchange(
        self_open_gate,
        f"GET http://{target}:{own}/ HTTP/1.1\r\nHost: {target}:{own}\r\n\r\n".encode(),
    )
    assert reply.status in (403, 502)
    time.sleep(0.2)
    # A loop would show the gate deciding its own forwarded request: a second client address.
    decisions = fresh_decisions(self_open_gate, before)
    assert decisions and len({d.client for d in decisions}) == 1


def test_connect_by_name_to_own_listener_is_refused(self_open_gate: RunningGate) -> None:
    own = self_open_gate.port
    before = len(self_open_gate.decisions)
    reply = exchange(
        self_open_gate,
        f"CONNECT gate.test:{own} HTTP/1.1\r\n\r\n".encode(),
        client_hello("gate.test"),
    )
    assert reply.status == 403
    decisions = fresh_decisions(self_open_gate, before)
    assert decisions and not decisions[-1].allowed


# -- class 13: resource abuse ----------------------------------------------------------------------


def test_idle_tunnels_and_slow_headers_do_not_starve_other_clients(
    gate: RunningGate, plain: Upstream, tls: Upstream
) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(120):  # slowloris: a request head that never ends
            socks.append(_open(gate, b"GET http://allowed.test/ HTTP/1.1\r\nX-Slow: a"))
        tunnels = [
            _open(gate, f"CONNECT allowed.test:{tls.port} HTTP/1.1\r\n\r\n".encode())
            for _ in range(120)
        ]
        socks += tunnels
        for sock in tunnels:
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
        for sock in socks[:120]:  # a few more bytes, the slowloris way
            sock.sendall(b"a")
        _served_promptly(gate, plain)
        # connection_strategy=lazy: an allowed but idle tunnel never opened an upstream connection.
        assert tls.accepted == 0
    finally:
        for sock in socks:
            sock.close()


def test_endless_connects_on_one_connection_are_each_refused_and_recorded(
    gate: RunningGate, dns: FakeDns, plain: Upstream
) -> None:
    count = 400
    before = len(gate.decisions)
    sock = _open(gate, b"".join(b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n" for _ in range(count)))
    try:
        sock.settimeout(WAIT)
        data = b""
        deadline = time.monotonic() + WAIT
        while data.count(b"HTTP/1.1 403") < count and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        _served_promptly(gate, plain)
    finally:
        sock.close()
    assert data.count(b"HTTP/1.1 403") == count
    assert dns.queries[-1:] != [("evil.test", "A", "udp")] and dns.count("evil.test") == 0
    decisions = [d for d in fresh_decisions(gate, before) if d.kind == "connect"]
    assert len(decisions) == count
    assert {(d.decision, d.reason) for d in decisions} == {(Verdict.DENY, Reason.NO_MATCHING_RULE)}


def _flood(sock: socket.socket, chunk: bytes, total: int) -> tuple[int, str]:
    """Send up to ``total`` bytes; returns (bytes sent, how it ended)."""
    sock.settimeout(2.0)
    sent = 0
    while sent < total:
        try:
            sock.sendall(chunk)
        except TimeoutError:
            return sent, "gate stopped reading"
        except (BrokenPipeError, ConnectionResetError):
            return sent, "gate closed the connection"
        sent += len(chunk)
        sock.setblocking(False)
        try:
            if sock.recv(65536, socket.MSG_PEEK):
                return sent, "gate answered"
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return sent, "gate closed the connection"
        finally:
            sock.settimeout(2.0)
    return sent, "all accepted"


HEAD_FLOOD = 8 * 1024 * 1024
CHUNK = b"X-Pad: " + b"a" * (64 * 1024 - 9) + b"\r\n"


@pytest.mark.parametrize(
    ("first", "chunk"),
    [
        (b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n", CHUNK),
        (b"GET http://allowed.test/", b"a" * 65536),
    ],
    ids=["huge-headers", "huge-request-line"],
)
def test_huge_request_head_does_not_starve_other_clients(
    gate: RunningGate, plain: Upstream, first: bytes, chunk: bytes
) -> None:
    sock = _open(gate, first)
    try:
        _flood(sock, chunk, 2 * 1024 * 1024)
        _served_promptly(gate, plain)
    finally:
        sock.close()
    assert plain.accepted == 1  # only the probe


@pytest.mark.parametrize(
    ("first", "chunk"),
    [
        (b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n", CHUNK),
        (b"GET http://allowed.test/", b"a" * 65536),
    ],
    ids=["huge-headers", "huge-request-line"],
)
def test_request_head_size_is_bounded(gate: RunningGate, first: bytes, chunk: bytes) -> None:
    sock = _open(gate, first)
    try:
        sent, ending = _flood(sock, chunk, HEAD_FLOOD)
    finally:
        sock.close()
    assert ending != "all accepted", f"the gate buffered a {sent >> 20} MiB request head"


def _post_denied(gate: RunningGate, size: int, wait: float = 3.0) -> bytes | None:
    """POST ``size`` body bytes to a denied host. Returns what came back within ``wait`` seconds:
    the reply bytes, ``b""`` when the gate closed the connection, None when it left it hanging."""
    sock = _open(
        gate,
        b"POST http://evil.test/upload HTTP/1.1\r\nHost: evil.test\r\n"
        b"Content-Length: %d\r\n\r\n" % size,
    )
    try:
        _flood(sock, b"x" * 65536, size)
        sock.setblocking(True)
        sock.settimeout(wait)
        return sock.recv(4096)
    except TimeoutError:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        sock.close()


def test_large_body_to_a_denied_host_is_never_relayed(
    gate: RunningGate, plain: Upstream, dns: FakeDns
) -> None:
    before = len(gate.decisions)
    _post_denied(gate, 1024 * 1024, wait=WAIT)  # until the gate refuses and closes
    wait_until(lambda: len(gate.decisions) > before)
    assert plain.accepted == 0 and dns.count("evil.test") == 0
    (decision,) = fresh_decisions(gate, before)
    assert (decision.decision, decision.reason) == (Verdict.DENY, Reason.NO_MATCHING_RULE)
    _served_promptly(gate, plain)


def test_small_body_to_a_denied_host_gets_the_refusal(gate: RunningGate) -> None:
    reply = _post_denied(gate, 200 * 1024)
    assert reply is not None and reply.startswith(b"HTTP/1.1 403")


@pytest.mark.parametrize("size", [1024 * 1024, 8 * 1024 * 1024], ids=["1MiB", "8MiB"])
def test_large_body_to_a_denied_host_is_refused_promptly(gate: RunningGate, size: int) -> None:
    """mitmproxy streams bodies over 256 KiB and cannot answer before reading them, so the gate
    kills the refused flow and closes the client's socket itself. 1 MiB may sit whole in socket
    buffers before the gate reads the head; 8 MiB cannot, so the client is still sending. Either way
    the client must see the close promptly, not hang until tcp_timeout."""
    reply = _post_denied(gate, size, wait=WAIT)
    assert reply is not None, "the gate left the refused client hanging"
    assert reply == b"" or reply.startswith(b"HTTP/1.1 403")
