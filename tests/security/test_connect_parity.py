"""Threat classes 1, 2 and 7 across the gate's two CONNECT parsers.

A connection whose first bytes are a complete CONNECT line is served by the tunnel front end
(``addons/tunnels.py``: ``connect_target`` on the peeked line, then ``_parse_connect``), and so is every
later CONNECT on it (``_parse_connect`` alone); a CONNECT that follows a plain-HTTP request on the same
connection is parsed by mitmproxy. A spelling one parser reads differently from the other
would be a way around whichever is stricter, so every spelling below goes through both, and both must
agree: the same canonical host admitted (the upstream reached once, the DNS server asked only for the
allowed name), or a refusal with nothing reaching the upstream and no lookup of anything but that name.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from proxy.core.decision import Kind, Reason, Verdict
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import WAIT, RunningGate, Upstream, client_hello
from tests.security import fresh_decisions, start_gate_with

pytestmark = pytest.mark.timeout(90)

# A refused plain-HTTP request first: it is mitmproxy's, and so is the connection from then on.
TO_MITMPROXY = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
# A refused CONNECT first: the front end's, which then parses the next head itself.
TO_FRONT_END = b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n"
PATHS = {"first": b"", "front end, later": TO_FRONT_END, "mitmproxy": TO_MITMPROXY}

# (authority with {port}, request line version, admitted? - None: either, see below)
SPELLINGS = [
    ("allowed.test:{port}", "HTTP/1.1", True),
    ("ALLOWED.Test:{port}", "HTTP/1.1", True),
    ("allowed.test.:{port}", "HTTP/1.1", True),
    ("[allowed.test]:{port}", "HTTP/1.1", True),  # both parsers drop the brackets before the host
    ("allowed.test:{port}", "HTTP/1.0", True),
    ("allowed.test:+{port}", "HTTP/1.1", False),
    ("allowed.test:{port}:{port}", "HTTP/1.1", False),
    ("allowed.test:{port}/x", "HTTP/1.1", False),
    ("allowed.test", "HTTP/1.1", False),
    ("allowed.test:", "HTTP/1.1", False),
    ("allowed%2etest:{port}", "HTTP/1.1", False),
    ("allowed.test\t:{port}", "HTTP/1.1", False),
    ("allowed.test@evil.test:{port}", "HTTP/1.1", False),
    ("evil.test@allowed.test:{port}", "HTTP/1.1", False),
    ("allowed.test.evil.test:{port}", "HTTP/1.1", False),
    ("*:{port}", "HTTP/1.1", False),
    ("http://allowed.test:{port}", "HTTP/1.1", False),
    ("127.0.0.1:{port}", "HTTP/1.1", False),
    ("127.1:{port}", "HTTP/1.1", False),
    ("[::ffff:127.0.0.1]:{port}", "HTTP/1.1", False),
    ("[::1]:{port}", "HTTP/1.1", False),
    ("[127.0.0.1]:{port}", "HTTP/1.1", False),
    # The front end refuses a version other than HTTP/1.x; mitmproxy reads the line as HTTP/1. Either
    # answer is safe as long as what is admitted is allowed.test.
    ("allowed.test:{port}", "HTTP/2.0", None),
]


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test", "evil.test", "allowed.test.evil.test")


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, tls: Upstream
) -> Iterator[RunningGate]:
    running = start_gate_with(
        tmp_path_factory.mktemp("parity"),
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: only-allowed
            hosts: [allowed.test]
            ports: [{tls.port}]
        """,
        dns.nameserver,
    )
    yield running
    running.stop()


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


def attempt(gate: RunningGate, connect: bytes, *, after: bytes) -> tuple[bool, bytes]:
    """Send ``connect`` (after the refused request ``after``, if any); when it is admitted, a
    ClientHello for allowed.test and the upstream's first answer. (admitted, what came back)."""
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    try:
        sock.settimeout(2.0)
        if after:
            sock.sendall(after)
            first = _read_head(sock)
            assert first.startswith(b"HTTP/1.1 403"), first[:200]
            length = next(
                int(line.split(b":")[1])
                for line in first.split(b"\r\n\r\n")[0].split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            rest = first.split(b"\r\n\r\n", 1)[1]
            while len(rest) < length:
                rest += sock.recv(65536)
        sock.sendall(connect)
        head = _read_head(sock)
        admitted = b" 200 " in head.split(b"\r\n")[0]
        if admitted:
            sock.sendall(client_hello("allowed.test"))
            return True, sock.recv(5)
        return False, head
    finally:
        sock.close()


@pytest.mark.parametrize(("authority", "version", "admitted"), SPELLINGS, ids=repr)
def test_both_connect_parsers_decide_a_spelling_alike(
    gate: RunningGate,
    dns: FakeDns,
    tls: Upstream,
    authority: str,
    version: str,
    admitted: bool | None,
) -> None:
    connect = f"CONNECT {authority.format(port=tls.port)} {version}\r\n\r\n".encode()
    for path, after in PATHS.items():
        dns.reset_queries()
        tls.reset()
        front_end_tunnels = gate.gate.tunnels.tunnels
        before = len(gate.decisions)
        got, reply = attempt(gate, connect, after=after)
        if after == TO_MITMPROXY:
            assert gate.gate.tunnels.tunnels == front_end_tunnels, "not served by mitmproxy"
        if after == TO_FRONT_END:
            assert gate.gate.tunnels.tunnels == front_end_tunnels + 1, "not the front end's"
        if admitted is not None:
            assert got is admitted, (path, reply[:200])
        assert {query[0] for query in dns.queries} <= {"allowed.test"}, path
        decided = [
            d
            for d in fresh_decisions(gate, before)
            if d.kind == Kind.CONNECT and d.host != "evil.test"
        ]
        if got:
            assert reply[:2] == b"\x16\x03", (path, reply)  # the upstream's ServerHello
            assert tls.accepted == 1, path
            assert [(d.decision, d.host) for d in decided] == [(Verdict.ALLOW, "allowed.test")]
        else:
            assert reply.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), (path, reply[:200])
            assert tls.accepted == 0 and tls.bytes_received == 0, path
            assert not [d for d in decided if d.allowed], path


# -- a later CONNECT the front end cannot serve ------------------------------------------------------


@pytest.fixture(scope="module")
def inspecting_gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, tls: Upstream
) -> Iterator[RunningGate]:
    directory = tmp_path_factory.mktemp("parity-inspected")
    running = start_gate_with(
        directory,
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: reads
            hosts: [allowed.test]
            ports: [{tls.port}]
            methods: [GET]
          - name: web
            hosts: [allowed.test]
            ports: [80]
        """,
        dns.nameserver,
        config={"confdir": str(directory / "state")},
    )
    yield running
    running.stop()


@pytest.mark.parametrize("port", ["tls", "80"])
def test_a_later_connect_whose_requests_are_read_is_refused_not_recorded_as_allowed(
    inspecting_gate: RunningGate, dns: FakeDns, tls: Upstream, port: str
) -> None:
    """The front end relays raw tunnels only; a tunnel whose requests must be read (an inspected
    host, port 80) asked for on a connection it already serves is refused with a reason and a
    record, before anything is looked up - never recorded as allowed and then cut off."""
    number = tls.port if port == "tls" else 80
    dns.reset_queries()
    tls.reset()
    front_end_tunnels = inspecting_gate.gate.tunnels.tunnels
    before = len(inspecting_gate.decisions)
    sock = socket.create_connection(("127.0.0.1", inspecting_gate.port), timeout=WAIT)
    try:
        sock.settimeout(2.0)
        sock.sendall(TO_FRONT_END)
        assert _read_head(sock).startswith(b"HTTP/1.1 403")
        sock.sendall(f"CONNECT allowed.test:{number} HTTP/1.1\r\n\r\n".encode())
        reply = _read_head(sock)
    finally:
        sock.close()
    assert inspecting_gate.gate.tunnels.tunnels == front_end_tunnels + 1
    assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
    assert b"first request on its connection" in reply
    assert dns.queries == []
    assert tls.accepted == 0
    decided = [d for d in fresh_decisions(inspecting_gate, before) if d.host == "allowed.test"]
    assert [(d.decision, d.reason) for d in decided] == [(Verdict.DENY, Reason.UNSUPPORTED)]


def test_control_a_first_connect_whose_requests_are_read_is_served(
    inspecting_gate: RunningGate, tls: Upstream
) -> None:
    front_end_tunnels = inspecting_gate.gate.tunnels.tunnels
    sock = socket.create_connection(("127.0.0.1", inspecting_gate.port), timeout=WAIT)
    try:
        sock.settimeout(2.0)
        sock.sendall(f"CONNECT allowed.test:{tls.port} HTTP/1.1\r\n\r\n".encode())
        assert _read_head(sock).startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    assert inspecting_gate.gate.tunnels.tunnels == front_end_tunnels  # mitmproxy's, to inspect
