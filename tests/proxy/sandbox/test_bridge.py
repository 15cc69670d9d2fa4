"""The relay used when joining a running gate: byte-exact, bounded, and it cuts connections on close."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest

from proxy.sandbox.bridge import Relay, UdpRelay
from tests.harness import LoopbackServer, closed_port, serving, wait_until

WAIT = 10.0


class Echo(LoopbackServer):
    """TCP server that echoes everything and counts connections."""

    def __init__(self) -> None:
        super().__init__(threaded=True, name="echo")

    def handle(self, conn: socket.socket) -> None:
        while data := conn.recv(1 << 16):
            conn.sendall(data)


@pytest.fixture
def echo() -> object:
    yield from serving(Echo())


def listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    return sock


def test_bulk_bytes_arrive_intact_both_ways(echo: Echo) -> None:
    relay = Relay(listener(), ("127.0.0.1", echo.port)).start()
    payload = os.urandom(8 << 20)
    try:
        client = socket.create_connection(relay.listener.getsockname(), timeout=WAIT)
        got = hashlib.sha256()
        received = 0

        def reader() -> None:
            nonlocal received
            while received < len(payload):
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                got.update(chunk)
                received += len(chunk)

        t = threading.Thread(target=reader)
        t.start()
        client.sendall(payload)
        t.join(WAIT)
        client.close()
        assert received == len(payload)
        assert got.digest() == hashlib.sha256(payload).digest()
    finally:
        relay.close()
    assert relay.stats.accepted == 1
    # The connection's thread adds its bytes when its stream ends, after the echo has arrived.
    wait_until(lambda: relay.stats.bytes_up >= len(payload))
    assert relay.stats.bytes_up == len(payload)


def test_connection_limit_closes_the_excess(echo: Echo) -> None:
    relay = Relay(listener(), ("127.0.0.1", echo.port), max_connections=1).start()
    try:
        first = socket.create_connection(relay.listener.getsockname(), timeout=WAIT)
        first.sendall(b"ping")
        assert first.recv(4) == b"ping"
        second = socket.create_connection(relay.listener.getsockname(), timeout=WAIT)
        assert second.recv(4) == b""  # closed at once
        assert relay.stats.refused == 1
        assert echo.accepted == 1
        first.close()
        second.close()
    finally:
        relay.close()


def test_unreachable_gate_closes_the_client() -> None:
    relay = Relay(listener(), ("127.0.0.1", closed_port())).start()
    try:
        client = socket.create_connection(relay.listener.getsockname(), timeout=WAIT)
        assert client.recv(10) == b""
        client.close()
    finally:
        relay.close()
    assert relay.stats.failed == 1


def test_close_cuts_open_connections(echo: Echo) -> None:
    relay = Relay(listener(), ("127.0.0.1", echo.port)).start()
    client = socket.create_connection(relay.listener.getsockname(), timeout=WAIT)
    client.sendall(b"x")
    assert client.recv(1) == b"x"
    relay.close()
    assert client.recv(10) == b""
    client.close()


def test_udp_relay_round_trip() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(WAIT)
    inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inside.bind(("127.0.0.1", 0))
    relay = UdpRelay(inside, server.getsockname()).start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(WAIT)
    try:
        client.sendto(b"query", inside.getsockname())
        data, addr = server.recvfrom(100)
        assert data == b"query"
        server.sendto(b"answer", addr)
        assert client.recv(100) == b"answer"
    finally:
        relay.close()
        client.close()
        server.close()
