"""Threat class 4: the gate connects only to the address it checked.

A name can mean one address to the gate's resolver and another to any other resolver on the box (or to
the same resolver a moment later: rebinding). Here ``localhost`` is answered by the gate's DNS server
(no hosts file) with 127.0.0.2, where the upstream listens, while the machine's own resolver says
127.0.0.1, where a canary listens on the same port. Every path that dials - the tunnel front end,
mitmproxy's CONNECT and plain-HTTP paths - must dial the checked 127.0.0.2: a dial by name would
reach the canary.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import pytest

from proxy.core.decision import Verdict
from tests.dnsfake import FakeDns
from tests.harness import (
    WAIT,
    Canary,
    RunningGate,
    Upstream,
    client_hello,
    recv_head,
    wait_until,
)
from tests.security import exchange, fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(60)

# A refused plain-HTTP request first: the connection is then mitmproxy's.
TO_MITMPROXY = b"GET http://refused.test/ HTTP/1.1\r\nHost: refused.test\r\n\r\n"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Upstream, Canary]]:
    upstream = Upstream("checked", host="127.0.0.2")
    try:
        canary = Canary("127.0.0.1", upstream.port)
    except OSError as exc:  # pragma: no cover - the port is taken on 127.0.0.1
        upstream.stop()
        pytest.skip(f"cannot bind the canary on 127.0.0.1:{upstream.port}: {exc}")
    yield upstream, canary
    canary.stop()
    upstream.stop()


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.set("localhost", "A", ["127.0.0.2"])
        yield server


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, pair: tuple[Upstream, Canary]
) -> Iterator[RunningGate]:
    upstream, _ = pair
    running = start_gate_with(
        tmp_path_factory.mktemp("pinning"),
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: the-name
            hosts: [localhost]
            ports: [{upstream.port}]
        """,
        dns.nameserver,
        resolver_kwargs={"hosts_file": None},
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(pair: tuple[Upstream, Canary]) -> None:
    upstream, canary = pair
    upstream.reset()
    canary.accepted = 0


def _tls_tunnel(
    gate: RunningGate, port: int, dialled: Callable[[], bool], *, after: bytes = b""
) -> None:
    """A TLS tunnel: only the ClientHello is needed to make the gate dial. Held open until
    ``dialled`` (an address was connected to), or ``WAIT`` passed."""
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    try:
        if after:
            sock.sendall(after)
            assert recv_head(sock).startswith(b"HTTP/1.1 403")
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):  # the refusal's body
                sock.recv(65536)
            sock.settimeout(WAIT)
        sock.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
        assert recv_head(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(client_hello("localhost"))
        wait_until(dialled)
    finally:
        sock.close()


@pytest.mark.parametrize("after", [b"", TO_MITMPROXY], ids=["front-end", "mitmproxy"])
def test_a_tunnel_dials_the_checked_address_not_the_name(
    gate: RunningGate, pair: tuple[Upstream, Canary], after: bytes
) -> None:
    upstream, canary = pair
    before = len(gate.decisions)
    _tls_tunnel(gate, upstream.port, lambda: upstream.accepted + canary.accepted > 0, after=after)
    assert canary.accepted == 0, "dialled by name: the machine's resolver chose the address"
    assert upstream.accepted == 1
    connects = [d for d in fresh_decisions(gate, before) if d.host == "localhost"]
    assert connects and connects[0].decision is Verdict.ALLOW
    assert {d.address for d in connects if d.allowed} == {"127.0.0.2"}


def test_a_plain_http_request_dials_the_checked_address_not_the_name(
    gate: RunningGate, pair: tuple[Upstream, Canary]
) -> None:
    upstream, canary = pair
    authority = f"localhost:{upstream.port}"
    requests = b"".join(
        f"GET http://{authority}/{n} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        for n in range(7)  # more than mitmproxy's per-address connection limit of 5
    )
    reply = exchange(gate, requests, responses=7)
    assert reply.statuses() == [200] * 7
    assert canary.accepted == 0, "dialled by name: the machine's resolver chose the address"
    assert [t for _, t, _ in upstream.requests] == [f"/{n}" for n in range(7)]
    assert all(h.get("host") == authority for _, _, h in upstream.requests)
