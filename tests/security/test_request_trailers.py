"""Threat classes 12, 16 and 18: fields a client sends after a request body (HTTP/2 trailers).

Request headers are judged and cleaned before anything is sent: client ``X-Egress-*`` fields and
``Proxy-Authorization`` are dropped, method overrides are judged by the request step, a credential
placeholder is judged by the credential step. Trailers come after the body, when the request has
been decided; passed on, they would carry exactly what the head may not (an HTTP/1 upstream reads
them as fields of the request). HTTP/1 requests with trailers are refused (mitmproxy's reader
cannot take them); HTTP/2 requests with trailers are refused the same way, as ``bad-request``,
and the upstream never receives a complete request with them.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from proxy.core.decision import Verdict
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import (
    WAIT,
    LocalCA,
    LoopbackServer,
    RunningGate,
    Upstream,
    serving,
    waited_for,
)
from tests.security import exchange, fresh_decisions, inspected_h2, inspecting, start_gate_with

pytestmark = pytest.mark.timeout(90)

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: writes
    hosts: [allowed.test]
    ports: [{port}, {tls_port}]
    methods: [GET, POST]
    paths: ["/api/**"]
"""

SMALL = b"abc"  # buffered by the gate before it is sent
LARGE = b"x" * (300 * 1024)  # past stream_large_bodies (256k): streamed as it comes


class RecordingUpstream(LoopbackServer):
    """A TLS upstream that records every byte of what it receives (chunked trailers included) and
    answers 200 once a request has ended."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls = tls
        self.received = b""
        self.generation = 0
        self.lock = threading.Lock()
        super().__init__(threaded=True, name="recording-upstream")

    def reset(self) -> None:
        """Forget what came so far; bytes still arriving on an earlier test's connection are
        not counted."""
        with self.lock:
            self.received = b""
            self.accepted = 0
            self.generation += 1

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        generation = self.generation
        with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
            data = b""
            for _ in range(10_000):  # bounded
                try:
                    chunk = tls_conn.recv(65536)
                except (OSError, ssl.SSLError):
                    break
                if not chunk:
                    break
                data += chunk
                with self.lock:
                    if generation == self.generation:
                        self.received += chunk
                if _complete(data):
                    tls_conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    data = b""


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole request: its head, then as much body as it announced."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if fields.get(b"transfer-encoding") == b"chunked":
        return body.endswith(b"\r\n\r\n") and (body.startswith(b"0\r\n") or b"\r\n0\r\n" in body)
    return len(body) >= int(fields.get(b"content-length", b"0") or 0)


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test")


@pytest.fixture(scope="module")
def upstream(test_ca: LocalCA) -> Iterator[RecordingUpstream]:
    yield from serving(RecordingUpstream(test_ca.server_context()))


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    upstream: RecordingUpstream,
    tls: Upstream,
    test_ca: LocalCA,
) -> Iterator[RunningGate]:
    directory = tmp_path_factory.mktemp("trailers")
    running = start_gate_with(
        directory,
        POLICY.format(port=upstream.port, tls_port=tls.port),
        dns.nameserver,
        config=inspecting(directory, test_ca),
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(upstream: RecordingUpstream, tls: Upstream) -> None:
    upstream.reset()
    tls.reset()


_OVER = (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)


def h2_post(
    gate: RunningGate,
    port: int,
    body: bytes,
    trailers: list[tuple[str, str]],
    path: str = "/api/x",
) -> list[h2.events.Event]:
    """One HTTP/2 POST /api/x in an inspected tunnel whose body is followed by ``trailers`` (none:
    the body ends the stream); the events the client saw until its stream ended (bounded)."""
    sock = inspected_h2(gate, "allowed.test", port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**24})
    client.increment_flow_control_window(2**24)
    head = [
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", f"allowed.test:{port}"),
        (":path", path),
        # typed as bytes: an untyped POST may be a form, whose body is held and read for _method
        ("content-type", "application/octet-stream"),
    ]
    client.send_headers(1, head)
    seen: list[h2.events.Event] = []
    pending, ended = body, False
    try:
        sock.settimeout(2.0)
        for _ in range(10_000):  # bounded: send what the window allows, then read what comes
            while pending and (
                size := min(
                    len(pending),
                    client.local_flow_control_window(1),
                    client.max_outbound_frame_size,
                )
            ):
                client.send_data(1, pending[:size])
                pending = pending[size:]
            if not pending and not ended:
                ended = True
                if trailers:
                    client.send_headers(1, trailers, end_stream=True)
                else:
                    client.end_stream(1)
            sock.sendall(client.data_to_send())
            data = sock.recv(65536)
            if not data:
                break
            seen += client.receive_data(data)
            if any(isinstance(e, _OVER) for e in seen):
                break
    except (TimeoutError, ConnectionResetError, ssl.SSLError, h2.exceptions.ProtocolError):
        pass
    finally:
        sock.close()
    return seen


def statuses(seen: list[h2.events.Event]) -> list[bytes | None]:
    return [
        dict(e.headers).get(b":status") for e in seen if isinstance(e, h2.events.ResponseReceived)
    ]


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["buffered", "streamed"])
def test_control_an_http2_post_without_trailers_reaches_the_upstream(
    gate: RunningGate, upstream: RecordingUpstream, body: bytes
) -> None:
    seen = h2_post(gate, upstream.port, body, [])
    assert statuses(seen) == [b"200"], (seen, upstream.received[:300])
    assert upstream.received.startswith(b"POST /api/x HTTP/1.1\r\n")


SMUGGLED = b"DELETE /api/y HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 0\r\n\r\n"


def test_an_http2_body_without_a_length_is_not_read_as_requests_by_an_http1_upstream(
    gate: RunningGate, tls: Upstream
) -> None:
    """HTTP/2 frames a body by its stream; HTTP/1 by Content-Length or chunks. A body sent on to an
    HTTP/1 upstream without either would be read there as the next request (here a DELETE the
    gate never judged)."""
    seen = h2_post(gate, tls.port, SMUGGLED, [])
    assert statuses(seen) == [b"200"], seen
    assert [(m, t) for m, t, _ in tls.requests] == [("POST", "/api/x")]
    assert tls.requests[0][2].get("content-length") == str(len(SMUGGLED))


def test_a_streamed_http2_body_without_a_length_goes_chunked_to_an_http1_upstream(
    gate: RunningGate, upstream: RecordingUpstream
) -> None:
    seen = h2_post(gate, upstream.port, LARGE, [])
    assert statuses(seen) == [b"200"], seen
    head = upstream.received.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\ntransfer-encoding: chunked" in head, head
    assert upstream.received.endswith(b"\r\n0\r\n\r\n")


TRAILERS = [
    ("x-egress-decision", "forged-allow"),
    ("x_egress_rule", "forged"),
    ("proxy-authorization", "Basic c2J4LW90aGVyOnRva2Vu"),
    ("x-http-method-override", "DELETE"),
]


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["buffered", "streamed"])
@pytest.mark.parametrize("field", TRAILERS, ids=[name for name, _ in TRAILERS])
def test_http2_request_trailers_are_refused_and_never_reach_the_upstream(
    gate: RunningGate, upstream: RecordingUpstream, body: bytes, field: tuple[str, str]
) -> None:
    before = len(gate.decisions)
    seen = h2_post(gate, upstream.port, body, [field])
    assert b"200" not in statuses(seen), seen
    received = upstream.received.lower()
    assert field[0].encode() not in received and field[1].lower().encode() not in received
    # whatever of a streamed body went on, the upstream never saw the request end
    assert b"\r\n0\r\n" not in received
    if body is SMALL:
        assert upstream.accepted == 0 and received == b""
        assert statuses(seen) == [b"400"], seen
    fresh = fresh_decisions(gate, before)
    refused = [d for d in fresh if d.decision is Verdict.DENY]
    assert [d.reason for d in refused] == ["bad-request"], fresh
    assert "trailer" in (refused[0].detail or "")


def test_a_head_mitmproxys_parser_refuses_is_recorded_on_one_line(gate: RunningGate) -> None:
    """The 400 mitmproxy's parser answers carries an HTML page; the decision records its message
    (which quotes the client's bytes) on one escaped line."""
    before = len(gate.decisions)
    reply = exchange(
        gate, b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\x1b[31m\r\n\r\n"
    )
    assert reply.data.startswith(b"HTTP/1.1 400"), reply.data[:200]
    refused = [d for d in fresh_decisions(gate, before) if d.decision is Verdict.DENY]
    assert [d.reason for d in refused] == ["bad-request"], refused
    detail = refused[0].detail or ""
    assert detail.startswith("the request head was refused as malformed: "), detail
    assert "\n" not in detail and "<" not in detail and "\x1b" not in detail, detail


def test_a_refused_request_with_trailers_is_recorded_once(
    gate: RunningGate, upstream: RecordingUpstream
) -> None:
    before = len(gate.decisions)
    seen = h2_post(gate, upstream.port, SMALL, [TRAILERS[0]], path="/elsewhere")
    assert statuses(seen) == [b"403"], seen
    assert upstream.accepted == 0 and upstream.received == b""
    refused = [d for d in fresh_decisions(gate, before) if d.decision is Verdict.DENY]
    assert len(refused) == 1 and refused[0].reason != "bad-request", refused


def test_an_http2_protocol_error_is_a_recorded_refusal(
    gate: RunningGate, upstream: RecordingUpstream
) -> None:
    """mitmproxy ends an HTTP/2 client's connection for a malformed frame (here DATA on stream 0,
    a connection error) with a GOAWAY before any hook sees a request: the refusal is recorded, as
    HTTP/1's malformed heads are, and nothing reaches the upstream."""
    before = len(gate.decisions)
    sock = inspected_h2(gate, "allowed.test", upstream.port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    try:
        sock.sendall(client.data_to_send())
        sock.sendall(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA, stream 0, 1 byte
        sock.settimeout(WAIT)
        goaway = False
        for _ in range(1_000):  # bounded: until the gate closes the connection
            data = sock.recv(65536)
            if not data:
                break
            with contextlib.suppress(h2.exceptions.ProtocolError):
                events = client.receive_data(data)
                goaway = goaway or any(
                    isinstance(e, h2.events.ConnectionTerminated) for e in events
                )
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.close()
    assert goaway
    refused = waited_for(
        lambda: [
            d for d in fresh_decisions(gate, before)
            if d.decision is Verdict.DENY and d.reason == "bad-request"
        ],
        "the protocol error's record",
    )  # fmt: skip
    assert len(refused) == 1 and "HTTP/2 connection was ended" in (refused[0].detail or "")
    assert upstream.accepted == 0 and upstream.received == b""
