"""Threat class 5 through a HelloRetryRequest: the second ClientHello must name the tunnel's host too.

A TLS 1.3 client that offers no key share the server can use gets a HelloRetryRequest and sends a
second ClientHello; a server that routes by name serves the name in that one. The gate decided the
tunnel's first ClientHello, so a client could name the allowed host first and another host second,
after the server's answer or in the same write as the first hello (the server reads it once it has
asked). Every variant is tried on both paths that relay tunnels: the front end, and mitmproxy's layers
(a CONNECT line that arrives in pieces goes there). Proof: the counting upstream received the first
ClientHello and nothing after it, and the refusal was recorded.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Kind, Reason, Verdict
from proxy.core.firstbytes import Protocol, classify
from tests.dnsfake import FakeDns
from tests.harness import (
    WAIT,
    LocalCA,
    LoopbackServer,
    RunningGate,
    Upstream,
    client_hello,
    recv_head,
    server_hello,
    serving,
    wait_until,
)
from tests.security import fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(60)

CCS = b"\x14\x03\x03\x00\x01\x01"  # the ChangeCipherSpec a compatible client sends before it
FIRST = client_hello("allowed.test")
FRONTED = client_hello("evil.test")
SAME = client_hello("allowed.test")
APP_DATA = b"\x17\x03\x03\x00\x05hello"


class RetryingServer(LoopbackServer):
    """Answers a whole first ClientHello with a HelloRetryRequest (or, with ``retry`` off, a
    ServerHello), then keeps every byte the client sends until it closes."""

    def __init__(self) -> None:
        self.retry = True
        self.received: list[bytes] = []
        self.answered = threading.Event()
        super().__init__(threaded=True, name="retrying-server")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        data = b""
        with self._lock:
            self.received.append(b"")
            index = len(self.received) - 1
        answered = False
        while chunk := conn.recv(65536):
            data += chunk
            with self._lock:
                self.received[index] = data
            if not answered and classify(443, data).protocol is not Protocol.WAIT:
                conn.sendall(server_hello(retry=self.retry))
                answered = True
                self.answered.set()

    def reset(self) -> None:
        with self._lock:
            self.accepted = 0
            self.received.clear()
        self.retry = True
        self.answered.clear()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RetryingServer]:
    server = RetryingServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, upstream: RetryingServer
) -> Iterator[RunningGate]:
    with FakeDns() as dns:
        dns.loopback("allowed.test", "evil.test")
        running = start_gate_with(
            tmp_path_factory.mktemp("hello-retry"),
            f"""
            version: 1
            allow_internal: [127.0.0.0/8]
            rules:
              - name: allowed
                hosts: [allowed.test]
                ports: [{upstream.port}]
            """,
            dns.nameserver,
        )
        yield running
        running.stop()


@pytest.fixture(autouse=True)
def _reset(upstream: RetryingServer) -> None:
    upstream.reset()


def _tunnel(gate: RunningGate, port: int, *, in_pieces: bool) -> socket.socket:
    """An admitted tunnel; ``in_pieces``: its CONNECT line split, so mitmproxy's layers serve it."""
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    connect = f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode()
    if in_pieces:
        handed = gate.gate.tunnels.handed
        sock.sendall(connect[:4])
        # the front end peeks a partial line and hands the connection to mitmproxy's layers: the
        # rest is sent once it has (sent sooner, the front end could read the whole line itself)
        assert wait_until(lambda: gate.gate.tunnels.handed == handed + 1), "never handed over"
        connect = connect[4:]
    sock.sendall(connect)
    assert recv_head(sock).startswith(b"HTTP/1.1 200")
    return sock


def _read_all(sock: socket.socket) -> tuple[bytes, bool]:
    """What the gate relays until it closes (True) or goes quiet (False): quiet is 1 s without a
    byte once something came (the first byte is waited for as long as any answer)."""
    data = b""
    for _ in range(64):
        sock.settimeout(1.0 if data else WAIT)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _send_through(
    gate: RunningGate, port: int, data: bytes, *, in_pieces: bool
) -> tuple[bytes, bool]:
    """``data`` through an admitted tunnel in one write; what came back and whether it closed."""
    sock = _tunnel(gate, port, in_pieces=in_pieces)
    try:
        sock.sendall(data)
        return _read_all(sock)
    finally:
        sock.close()


def _received(upstream: RetryingServer) -> bytes:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not upstream.received:
        time.sleep(0.02)
    time.sleep(0.3)  # anything relayed after the retry has arrived by now
    (data,) = upstream.received
    return data


PATHS = [False, True]
PATH_IDS = ["front-end", "mitmproxy"]


@pytest.mark.parametrize("in_pieces", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    "second", [FRONTED, CCS + FRONTED], ids=["second-hello", "ccs-then-second-hello"]
)
def test_a_second_hello_naming_another_host_never_reaches_the_server(
    gate: RunningGate, upstream: RetryingServer, in_pieces: bool, second: bytes
) -> None:
    before = len(gate.decisions)
    sock = _tunnel(gate, upstream.port, in_pieces=in_pieces)
    try:
        sock.sendall(FIRST)
        assert upstream.answered.wait(WAIT)
        reply, _ = _read_all(sock)
        assert reply == server_hello(retry=True)  # the retry itself reaches the client
        sock.sendall(second)
        _, closed = _read_all(sock)
    finally:
        sock.close()
    assert closed
    assert _received(upstream) == FIRST
    decisions = [(d.kind, d.decision, d.reason) for d in fresh_decisions(gate, before)]
    assert decisions[-2:] == [
        (Kind.TLS, Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
        (Kind.TLS, Verdict.DENY, Reason.SNI_MISMATCH),
    ]


@pytest.mark.parametrize("in_pieces", PATHS, ids=PATH_IDS)
def test_a_second_hello_sent_with_the_first_is_held_and_refused(
    gate: RunningGate, upstream: RetryingServer, in_pieces: bool
) -> None:
    """Both hellos in one write: the server would read the second once it has asked for it."""
    before = len(gate.decisions)
    _, closed = _send_through(gate, upstream.port, FIRST + CCS + FRONTED, in_pieces=in_pieces)
    assert closed
    assert _received(upstream) == FIRST
    assert fresh_decisions(gate, before)[-1].reason == Reason.SNI_MISMATCH


@pytest.mark.parametrize("in_pieces", PATHS, ids=PATH_IDS)
def test_a_hello_with_a_second_hello_in_its_record_is_refused(
    gate: RunningGate, upstream: RetryingServer, in_pieces: bool
) -> None:
    """Two ClientHello messages coalesced in one record: the first is all the gate would judge."""
    record = FIRST[5:] + FRONTED[5:]
    coalesced = FIRST[:3] + len(record).to_bytes(2, "big") + record
    before = len(gate.decisions)
    _, closed = _send_through(gate, upstream.port, coalesced, in_pieces=in_pieces)
    assert closed
    assert upstream.accepted == 0
    assert fresh_decisions(gate, before)[-1].reason == Reason.NOT_TLS


@pytest.mark.parametrize("in_pieces", PATHS, ids=PATH_IDS)
def test_a_hello_whose_record_announces_a_second_hello_still_to_come_is_refused(
    gate: RunningGate, upstream: RetryingServer, in_pieces: bool
) -> None:
    """The coalesced record sent in two writes, the first ending with the first hello: judged from
    the bytes present it looked whole, and the second hello (the record's tail) went on to the
    server as part of the first, on mitmproxy's path at once."""
    record = FIRST[5:] + FRONTED[5:]
    header = FIRST[:3] + len(record).to_bytes(2, "big")
    before = len(gate.decisions)
    sock = _tunnel(gate, upstream.port, in_pieces=in_pieces)
    try:
        sock.sendall(header + FIRST[5:])
        time.sleep(0.3)  # read by the gate alone, before the rest
        with contextlib.suppress(OSError):  # closed by the gate already
            sock.sendall(FRONTED[5:])
        _, closed = _read_all(sock)
    finally:
        sock.close()
    assert closed
    assert upstream.accepted == 0
    assert fresh_decisions(gate, before)[-1].reason == Reason.NOT_TLS


@pytest.mark.parametrize("in_pieces", PATHS, ids=PATH_IDS)
def test_control_a_second_hello_for_the_same_host_is_relayed(
    gate: RunningGate, upstream: RetryingServer, in_pieces: bool
) -> None:
    before = len(gate.decisions)
    reply, closed = _send_through(
        gate, upstream.port, FIRST + CCS + SAME + APP_DATA, in_pieces=in_pieces
    )
    assert reply == server_hello(retry=True) and not closed
    assert _received(upstream) == FIRST + CCS + SAME + APP_DATA
    tls = [d for d in fresh_decisions(gate, before) if d.kind == Kind.TLS]
    assert [d.decision for d in tls] == [Verdict.ALLOW, Verdict.ALLOW]


@pytest.mark.parametrize("in_pieces", PATHS, ids=PATH_IDS)
def test_control_bytes_after_the_hello_go_on_once_the_server_has_not_asked_again(
    gate: RunningGate, upstream: RetryingServer, in_pieces: bool
) -> None:
    upstream.retry = False
    reply, closed = _send_through(gate, upstream.port, FIRST + CCS + APP_DATA, in_pieces=in_pieces)
    assert reply == server_hello() and not closed
    assert _received(upstream) == FIRST + CCS + APP_DATA


@pytest.fixture(scope="module")
def p256_only(test_ca: LocalCA) -> Iterator[Upstream]:
    """A real TLS server that takes only P-256 key shares: a client that offers an X25519 share
    first (OpenSSL's default) is asked again."""
    context = test_ca.server_context()
    context.set_ecdh_curve("prime256v1")
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    yield from serving(Upstream("p256", tls=context))


@pytest.mark.parametrize("in_pieces", PATHS, ids=PATH_IDS)
def test_control_a_real_client_asked_again_by_a_real_server_completes_its_request(
    tmp_path: Path, test_ca: LocalCA, p256_only: Upstream, in_pieces: bool
) -> None:
    p256_only.reset()
    with FakeDns() as dns:
        dns.loopback("allowed.test")
        gate = start_gate_with(
            tmp_path,
            f"""
            version: 1
            allow_internal: [127.0.0.0/8]
            rules:
              - name: allowed
                hosts: [allowed.test]
                ports: [{p256_only.port}]
            """,
            dns.nameserver,
        )
        try:
            raw = _tunnel(gate, p256_only.port, in_pieces=in_pieces)
            context = ssl.create_default_context(cafile=str(test_ca.ca_path))
            with context.wrap_socket(raw, server_hostname="allowed.test") as tls:
                tls.sendall(b"GET /retried HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
                assert recv_head(tls).startswith(b"HTTP/1.1 200")
            tls_decisions = [d for d in gate.decisions if d.kind == Kind.TLS]
        finally:
            gate.stop()
    assert [(m, t) for m, t, _ in p256_only.requests] == [("GET", "/retried")]
    assert [d.decision for d in tls_decisions] == [Verdict.ALLOW, Verdict.ALLOW]  # asked again


def test_both_hellos_pipelined_with_the_connect_are_held_and_refused(
    gate: RunningGate, upstream: RetryingServer
) -> None:
    """The CONNECT, both hellos and application data in one write, before any answer."""
    before = len(gate.decisions)
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    try:
        connect = f"CONNECT allowed.test:{upstream.port} HTTP/1.1\r\n\r\n".encode()
        sock.sendall(connect + FIRST + CCS + FRONTED + APP_DATA)
        reply, closed = _read_all(sock)
    finally:
        sock.close()
    assert closed and reply.startswith(b"HTTP/1.1 200")
    assert _received(upstream) == FIRST
    assert fresh_decisions(gate, before)[-1].reason == Reason.SNI_MISMATCH
