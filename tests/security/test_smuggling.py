"""Threat class 16: request smuggling past the request step.

The request step judges the requests the gate's HTTP parser sees. A head whose body length two parsers
read differently (``Content-Length`` and ``Transfer-Encoding`` together, two lengths, a transfer coding
HTTP/1.0 does not have, a folded or mis-spelled framing header) lets a second request ride inside the
first one's body: the gate judges an allowed read, an upstream that frames by ``Content-Length`` (as the
counting upstream here does) then reads a write the gate never saw. Every such head must be refused
before any upstream connection exists, inside an inspected tunnel and as plain HTTP alike. Over HTTP/2
the same request is a stream whose ``content-length`` disagrees with its DATA (or that carries a
``transfer-encoding``): translated to HTTP/1 for the upstream, it would be the same desync.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest

from proxy.core.decision import Kind, Verdict
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import WAIT, LocalCA, RunningGate, Upstream, recv_head
from tests.security import exchange, fresh_decisions, inspected_h2, inspecting, start_gate_with

pytestmark = pytest.mark.timeout(90)

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: reads
    hosts: [allowed.test]
    ports: [80, {tls_port}, {plain_port}]
    methods: [GET]
    paths: ["/read/**"]
"""

SMUGGLED = b"POST /write HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 0\r\n\r\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"


# (name, extra header lines, body): each makes the request step and a Content-Length-framing
# upstream disagree about where the allowed GET ends.
ATTACKS = [
    (
        "te-and-cl",
        b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        _chunked(SMUGGLED),
    ),
    (
        "cl-and-te",
        b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(b"0\r\n\r\n"),
        b"0\r\n\r\n" + SMUGGLED,
    ),
    (
        "two-lengths",
        b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(SMUGGLED),
        SMUGGLED,
    ),
    ("length-list", b"Content-Length: 0, %d\r\n" % len(SMUGGLED), SMUGGLED),
    ("signed-length", b"Content-Length: +%d\r\n" % len(SMUGGLED), SMUGGLED),
    (
        "two-codings",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        _chunked(SMUGGLED),
    ),
    ("coding-list", b"Transfer-Encoding: chunked, identity\r\n", _chunked(SMUGGLED)),
    ("unknown-coding", b"Transfer-Encoding: xchunked\r\n", _chunked(SMUGGLED)),
    ("space-before-colon", b"Transfer-Encoding : chunked\r\n", _chunked(SMUGGLED)),
    ("folded-coding", b"Transfer-Encoding:\r\n chunked\r\n", _chunked(SMUGGLED)),
    # A continuation line (obs-fold) is part of the field above it for the gate's parser; an
    # upstream that reads it as a field of its own reads a length of 0 and the body as a request.
    (
        "folded-length",
        b"Content-Length: %d\r\nX-Pad: 1\r\n Content-Length: 0\r\n" % len(SMUGGLED),
        SMUGGLED,
    ),
    (
        "folded-tab-length",
        b"Content-Length: %d\r\nX-Pad: 1\r\n\tContent-Length: 0\r\n" % len(SMUGGLED),
        SMUGGLED,
    ),
    # A bare CR or a NUL inside a value ends the field for some parsers (RFC 9110 5.5).
    (
        "cr-in-value",
        b"Content-Length: %d\r\nX-Pad: 1\rContent-Length: 0\r\n" % len(SMUGGLED),
        SMUGGLED,
    ),
    (
        "nul-in-value",
        b"Content-Length: %d\r\nX-Pad: 1\x00\r\n" % len(SMUGGLED),
        SMUGGLED,
    ),
]


def attack(target: str, authority: str, extra: bytes, body: bytes, version: str = "1.1") -> bytes:
    head = f"GET {target} HTTP/{version}\r\nHost: {authority}\r\n".encode()
    return head + extra + b"\r\n" + body


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test")


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    tls: Upstream,
    plain: Upstream,
    test_ca: LocalCA,
) -> Iterator[RunningGate]:
    directory = tmp_path_factory.mktemp("smuggling")
    running = start_gate_with(
        directory,
        POLICY.format(tls_port=tls.port, plain_port=plain.port),
        dns.nameserver,
        config=inspecting(directory, test_ca),
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(tls: Upstream, plain: Upstream) -> None:
    tls.reset()
    plain.reset()


def inspected_tunnel(gate: RunningGate, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    raw.sendall(f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode())
    assert recv_head(raw).startswith(b"HTTP/1.1 200"), "the tunnel was not admitted"
    ca = gate.ca
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["http/1.1"])
    return context.wrap_socket(raw, server_hostname="allowed.test")


def read_reply(sock: socket.socket) -> bytes:
    """What the gate answers before it closes or goes quiet (bounded): quiet is 1 s without a byte
    once something came (the first byte is waited for as long as any answer)."""
    data = b""
    for _ in range(64):
        sock.settimeout(1.0 if data else WAIT)
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def assert_nothing_smuggled(
    gate: RunningGate, upstream: Upstream, before: int, reply: bytes
) -> None:
    assert reply.startswith(b"HTTP/1.1 4"), reply[:200]
    assert upstream.accepted == 0, upstream.requests
    assert upstream.bytes_received == 0
    assert not [d for d in fresh_decisions(gate, before) if d.allowed and d.kind == "request"]
    assert [d for d in fresh_decisions(gate, before) if d.decision is Verdict.DENY], (
        "the refusal was not recorded"
    )


def test_control_an_allowed_read_reaches_the_upstream(gate: RunningGate, tls: Upstream) -> None:
    """The attacks below differ from this request only in their framing headers and body."""
    sock = inspected_tunnel(gate, tls.port)
    try:
        sock.sendall(attack("/read/x", f"allowed.test:{tls.port}", b"", b""))
        reply = read_reply(sock)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert [(m, t) for m, t, _ in tls.requests] == [("GET", "/read/x")]


@pytest.mark.parametrize(("name", "extra", "body"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_smuggling_inside_an_inspected_tunnel_never_reaches_the_upstream(
    gate: RunningGate, tls: Upstream, name: str, extra: bytes, body: bytes
) -> None:
    before = len(gate.decisions)
    sock = inspected_tunnel(gate, tls.port)
    try:
        sock.sendall(attack("/read/x", f"allowed.test:{tls.port}", extra, body))
        reply = read_reply(sock)
    finally:
        sock.close()
    assert_nothing_smuggled(gate, tls, before, reply)


@pytest.mark.parametrize(("name", "extra", "body"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_smuggling_as_plain_http_never_reaches_the_upstream(
    gate: RunningGate, plain: Upstream, name: str, extra: bytes, body: bytes
) -> None:
    before = len(gate.decisions)
    authority = f"allowed.test:{plain.port}"
    reply = exchange(gate, attack(f"http://{authority}/read/x", authority, extra, body))
    assert_nothing_smuggled(gate, plain, before, reply.data)


def test_chunked_http10_request_is_refused(gate: RunningGate, plain: Upstream) -> None:
    """HTTP/1.0 has no chunked coding: an HTTP/1.0 upstream reads the chunks as a next request."""
    before = len(gate.decisions)
    authority = f"allowed.test:{plain.port}"
    data = attack(
        f"http://{authority}/read/x",
        authority,
        b"Transfer-Encoding: chunked\r\n",
        _chunked(SMUGGLED),
        version="1.0",
    )
    reply = exchange(gate, data)
    assert_nothing_smuggled(gate, plain, before, reply.data)


# -- HTTP/2 streams whose length disagrees with their data -----------------------------------------


def h2_exchange(
    gate: RunningGate, port: int, extra: list[tuple[str, str]], body: bytes
) -> list[h2.events.Event]:
    """One HTTP/2 GET /read/x in an inspected tunnel, with ``extra`` header fields and ``body`` as
    DATA; the events the client saw until the gate closed or went quiet (bounded)."""
    sock = inspected_h2(gate, "allowed.test", port)
    # The client's own checks are off: it must be able to send what a hostile client sends.
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    fields = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", f"allowed.test:{port}"),
        (":path", "/read/x"),
        *extra,
    ]
    client.send_headers(1, fields, end_stream=not body)
    wire = client.data_to_send()
    if body:  # framed by hand: the client library would refuse to send a length that lies
        wire += hyperframe.frame.DataFrame(1, data=body, flags=["END_STREAM"]).serialize()
    seen: list[h2.events.Event] = []
    try:
        sock.sendall(wire)
        sock.settimeout(1.5)
        for _ in range(64):
            data = sock.recv(65536)
            if not data:
                break
            seen += client.receive_data(data)
            if any(
                isinstance(e, h2.events.StreamEnded | h2.events.ConnectionTerminated) for e in seen
            ):
                break
            sock.sendall(client.data_to_send())
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    finally:
        sock.close()
    return seen


H2_ATTACKS = [
    ("length-zero", [("content-length", "0")], SMUGGLED),
    ("length-short", [("content-length", "3")], SMUGGLED),
    ("transfer-encoding", [("transfer-encoding", "chunked")], _chunked(SMUGGLED)),
]


def test_control_an_http2_read_reaches_the_upstream(gate: RunningGate, tls: Upstream) -> None:
    seen = h2_exchange(gate, tls.port, [], b"")
    statuses = [
        dict(e.headers).get(b":status") for e in seen if isinstance(e, h2.events.ResponseReceived)
    ]
    assert statuses == [b"200"]
    assert [(m, t) for m, t, _ in tls.requests] == [("GET", "/read/x")]


@pytest.mark.parametrize(("name", "extra", "body"), H2_ATTACKS, ids=[a[0] for a in H2_ATTACKS])
def test_an_http2_stream_whose_length_lies_never_reaches_the_upstream(
    gate: RunningGate, tls: Upstream, name: str, extra: list[tuple[str, str]], body: bytes
) -> None:
    before = len(gate.decisions)
    seen = h2_exchange(gate, tls.port, extra, body)
    assert not [e for e in seen if isinstance(e, h2.events.ResponseReceived)]
    assert [e for e in seen if isinstance(e, h2.events.ConnectionTerminated)], seen
    assert tls.accepted == 0 and tls.bytes_received == 0, tls.requests
    assert not [d for d in fresh_decisions(gate, before) if d.kind == Kind.REQUEST and d.allowed]


TRAILERS = b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nX-Egress-Decision: allow\r\n\r\n"


@pytest.mark.parametrize("inspected", [False, True], ids=["plain", "inspected"])
def test_a_chunked_body_with_trailers_is_refused_not_left_hanging(
    gate: RunningGate, tls: Upstream, plain: Upstream, inspected: bool
) -> None:
    """mitmproxy's HTTP/1 reader cannot take trailer fields: the request is refused and the
    connection closed, instead of a connection nobody reads and a request recorded as allowed but
    never sent."""
    before = len(gate.decisions)
    upstream = tls if inspected else plain
    authority = f"allowed.test:{upstream.port}"
    if inspected:
        sock = inspected_tunnel(gate, tls.port)
        try:
            sock.sendall(attack("/read/x", authority, *TRAILERS))
            reply = read_reply(sock)
        finally:
            sock.close()
    else:
        reply = exchange(gate, attack(f"http://{authority}/read/x", authority, *TRAILERS)).data
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert upstream.accepted == 0 and upstream.bytes_received == 0
    reasons = [d.reason for d in fresh_decisions(gate, before) if d.decision is Verdict.DENY]
    assert "bad-request" in reasons
