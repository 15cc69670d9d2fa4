"""The tunnel front end: which connections it takes, the bytes it relays (counted exactly, half-closes
passed on), and that everything else still reaches mitmproxy's layers and their checks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from addons.tunnels import _parse_connect, connect_target
from proxy.core.decision import Reason, Verdict
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.evidence.emit import Emitter
from tests.harness import (
    WAIT,
    LoopbackServer,
    RunningGate,
    Upstream,
    answered_during_a_flood,
    client_hello,
    recv_head,
    server_hello,
    serving,
    wait_until,
    waited_for,
)
from tests.proxy.core.test_checkpoint import FailingJournal

REPLY = b"R" * 100_000
HELLO = client_hello(None)


SERVER_HELLO = server_hello()


class HalfCloseUpstream(LoopbackServer):
    """Answers a whole ClientHello with a ServerHello, reads until the client's EOF, then answers
    with REPLY and closes: works only if the relay passes the client's half-close on and still
    relays the other direction afterwards. A client that closes before reading the reply resets
    the connection; what it sent has been received by then, and that is what the tests read."""

    def __init__(self) -> None:
        self.received = b""
        super().__init__(name="half-close")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        answered = False
        while chunk := conn.recv(65536):
            self.received += chunk
            if not answered and len(self.received) >= len(HELLO):
                conn.sendall(SERVER_HELLO)  # the bytes after the hello wait for this
                answered = True
        conn.sendall(REPLY)


@pytest.fixture
def half_close() -> Iterator[HalfCloseUpstream]:
    yield from serving(HalfCloseUpstream())


def _gate(tmp_path: Path, *ports: int, loop: str = "asyncio") -> RunningGate:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: local\n    cidrs: [127.0.0.1/32]\n    ports: {list(ports)}\n"
    )
    return RunningGate(policy, ["127.0.0.1:9"], loop=loop).start()


def _connect(port: int, target: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    return sock, recv_head(sock)


def _closed_event(gate: RunningGate) -> dict[str, object]:
    def closed() -> dict[str, object] | None:
        events = list(gate.memory.events)
        return next((a for name, a in events if name == "egress.connection.closed"), None)

    return waited_for(closed, "a connection-closed event")


def test_a_tls_tunnel_is_relayed_with_half_close_and_exact_byte_counts(
    tmp_path: Path, half_close: HalfCloseUpstream
) -> None:
    gate = _gate(tmp_path, half_close.port)
    try:
        sock, head = _connect(gate.port, f"127.0.0.1:{half_close.port}")
        assert head.startswith(b"HTTP/1.1 200")
        hello = HELLO
        sock.sendall(hello + b"after the hello")
        sock.shutdown(socket.SHUT_WR)  # the upstream answers only once it has seen this EOF
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        assert reply == SERVER_HELLO + REPLY
        assert half_close.received == hello + b"after the hello"
        closed = _closed_event(gate)
        assert closed["bytes_out"] == len(hello) + len(b"after the hello")
        assert closed["bytes_in"] == len(SERVER_HELLO) + len(REPLY)
        assert gate.gate.tunnels.tunnels == 1  # taken by the front end, not mitmproxy's layers
    finally:
        gate.stop()


class ResettingUpstream(LoopbackServer):
    """Answers the ClientHello with a ServerHello and part of a reply, then resets the connection
    (a server that crashed or aborted mid-response)."""

    def __init__(self) -> None:
        super().__init__(name="resetting")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        received = b""
        while len(received) < len(HELLO) and (chunk := conn.recv(65536)):
            received += chunk
        conn.sendall(SERVER_HELLO + b"part of a reply")
        time.sleep(0.2)  # the gate relays it before the reset comes
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_upstream_reset_reaches_the_client_as_a_reset(tmp_path: Path, loop: str) -> None:
    """What came before the reset is relayed, then the client is reset: a clean end would pass a
    transfer cut short off as a complete one to a client that reads to the end."""
    upstream = ResettingUpstream()
    gate = _gate(tmp_path, upstream.port, loop=loop)
    try:
        sock, head = _connect(gate.port, f"127.0.0.1:{upstream.port}")
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(HELLO)
        received = b""
        with pytest.raises(ConnectionResetError):
            for _ in range(1000):  # bounded: the reset ends it
                chunk = sock.recv(65536)
                assert chunk, f"a clean end after {received!r}"
                received += chunk
        sock.close()
        assert received == SERVER_HELLO + b"part of a reply"
    finally:
        gate.stop()
        upstream.stop()


def test_a_refused_hello_dials_nothing(tmp_path: Path, half_close: HalfCloseUpstream) -> None:
    gate = _gate(tmp_path, half_close.port)
    try:
        sock, head = _connect(gate.port, f"127.0.0.1:{half_close.port}")
        assert head.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: elsewhere\r\n\r\n")  # not TLS on a TLS port
        assert sock.recv(100) == b""  # closed without an answer
        sock.close()
        assert half_close.accepted == 0
        assert [d.reason for d in gate.decisions][-1] == "not-tls"
    finally:
        gate.stop()


class OneProcess:
    """A sandbox whose every connection is one known process (the lookup of ``egress run``).
    With ``after``, a lookup waits (bounded) until the test has seen what it waits for, and says
    whether it came (``in_time``)."""

    def __init__(self, after: threading.Event | None = None) -> None:
        self.asked: list[str] = []
        self.after = after
        self.in_time: list[bool] = []

    def attribute(self, peer: str, *, every_owner: bool = False, identity: bool = True) -> object:
        return self.attribute_now(peer)

    def attribute_now(self, peer: str, *, identity: bool = True) -> object:
        self.asked.append(peer)
        if self.after is not None:
            self.in_time.append(self.after.wait(WAIT / 3))
        return object()

    def remember(self, peer: str, found: object, owner: object = None) -> None:
        pass

    def forget(self, peer: str | None, owner: object = None) -> None:
        pass


def _sandbox_gate(tmp_path: Path, port: int, processes: OneProcess, **emitter: Any) -> RunningGate:
    """A gate that sees its sandbox's processes (and so may answer a tunnel before its lookup)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nallow_internal: [127.0.0.0/8]\nrules:\n"
        f"  - name: local\n    cidrs: [127.0.0.1/32]\n    ports: [{port}]\n"
    )
    gate = RunningGate(policy, ["127.0.0.1:9"], gate_kwargs={"processes": processes})
    gate.emitter = Emitter([gate.memory], **emitter)
    return gate.start()


def test_a_tunnel_answered_before_its_lookup_is_relayed_and_looked_up_once(
    tmp_path: Path, half_close: HalfCloseUpstream
) -> None:
    """No rule is bound to executables: the client has its 200 before its process is looked up
    (the lookup here waits for the client to have it), and the tunnel then works as ever."""
    answered = threading.Event()
    processes = OneProcess(after=answered)
    gate = _sandbox_gate(tmp_path, half_close.port, processes)
    try:
        sock, head = _connect(gate.port, f"127.0.0.1:{half_close.port}")
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        answered.set()
        sock.sendall(HELLO)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        assert reply == SERVER_HELLO + REPLY and half_close.received == HELLO
        assert processes.asked == [client] and processes.in_time == [True]
        assert [(d.kind, d.decision) for d in gate.decisions] == [
            ("connect", Verdict.ALLOW),
            ("tls", Verdict.ALLOW),
        ]
    finally:
        gate.stop()


def test_a_tunnel_answered_before_its_record_that_the_record_refuses_is_closed(
    tmp_path: Path, half_close: HalfCloseUpstream
) -> None:
    """The client had its 200 while the process was looked up; then the write-ahead journal could
    not record the tunnel (audit required): the gate closes it, sends nothing more (no refusal
    after a 200) and dials nothing."""
    gate = _sandbox_gate(
        tmp_path,
        half_close.port,
        OneProcess(),
        write_ahead=[FailingJournal()],
        audit_required=True,
    )
    try:
        sock, head = _connect(gate.port, f"127.0.0.1:{half_close.port}")
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        with contextlib.suppress(OSError):
            sock.sendall(HELLO)
        rest = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                rest += chunk
        sock.close()
        assert rest == b""
        assert half_close.accepted == 0
        assert [(d.decision, d.reason) for d in gate.decisions] == [
            (Verdict.DENY, Reason.AUDIT_UNAVAILABLE)
        ]
    finally:
        gate.stop()


def test_plain_http_and_port_80_tunnels_go_to_mitmproxys_layers(tmp_path: Path) -> None:
    upstream = Upstream("plain")
    gate = _gate(tmp_path, upstream.port, 80)
    try:
        sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        target = f"127.0.0.1:{upstream.port}"
        sock.sendall(f"GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert recv_head(sock).startswith(b"HTTP/1.1 200")
        sock.close()
        sock, head = _connect(gate.port, "127.0.0.1:80")
        sock.close()
        assert head.startswith(b"HTTP/1.1 200")
        assert gate.gate.tunnels.tunnels == 0
        assert [d.kind for d in gate.decisions] == ["http", "connect"]
    finally:
        gate.stop()
        upstream.stop()


def test_what_the_front_end_takes() -> None:
    assert connect_target(b"CONNECT pypi.org:443 HTTP/1.1\r\n") == ("pypi.org", 443)
    assert connect_target(b"CONNECT [::1]:22 HTTP/1.1\r\nHost: x\r\n\r\n") == ("::1", 22)
    # its requests are decided one by one
    assert connect_target(b"CONNECT pypi.org:80 HTTP/1.1\r\n") is None
    assert connect_target(b"CONNECT pypi.org:443 HTTP/1.1") is None  # the line is not complete
    assert connect_target(b"GET http://pypi.org/ HTTP/1.1\r\n") is None
    assert connect_target(b"CONNECT pypi.org:443 HTTP/1.1 extra\r\n") is None
    assert connect_target(b"CONNECT 2001::1:443 HTTP/1.1\r\n") is None  # bare IPv6


def test_connect_heads_are_parsed_strictly() -> None:
    assert _parse_connect(
        b"CONNECT [::1]:443 HTTP/1.1\r\nProxy-Authorization: Basic x\r\n\r\n"
    ) == (
        "::1",
        443,
        "Basic x",
        [(b"Proxy-Authorization", b"Basic x")],
    )
    assert _parse_connect(b"CONNECT a.test HTTP/1.1\r\n\r\n") is None  # no port
    assert _parse_connect(b"CONNECT a.test:443 HTTP/1.1\r\nbad header\r\n\r\n") is None
    assert _parse_connect(b"CONNECT a.test:443 HTTP/1.1\r\nX: a\x00b\r\n\r\n") is None
    assert _parse_connect(b"CONNECT a.test:443 HTTP/1.1\r\n folded\r\n\r\n") is None
    assert _parse_connect(b"CONNECT user@a.test:443 HTTP/1.1\r\n\r\n") is None
    assert _parse_connect(b"CONNECT a.test:443 HTTP/2\r\n\r\n") is None
    # The host itself is the policy's to judge: an invalid one is refused and recorded there.
    parsed = _parse_connect(b"CONNECT a\x00b.test:443 HTTP/1.1\r\n\r\n")
    assert parsed is not None
    with pytest.raises(InvalidHost):
        canonical_host(parsed[0])


def test_a_connect_header_value_may_hold_no_control_character_but_the_tab() -> None:
    """Every byte value in a header value: the C0 controls but the tab, and DEL, make the head
    malformed (a 400); everything else, the tab and bytes above DEL included, is taken as before."""
    for byte in range(256):  # a lone CR or LF too: only CRLF ends a line
        head = b"CONNECT a.test:443 HTTP/1.1\r\nX-Value: a" + bytes([byte]) + b"b\r\n\r\n"
        control = (byte < 0x20 and byte != 0x09) or byte == 0x7F
        assert (_parse_connect(head) is None) is control, hex(byte)


def test_a_port_80_connect_after_a_refusal_is_never_relayed_raw(tmp_path: Path) -> None:
    """The front end takes a connection by its first CONNECT; a later CONNECT to port 80 on it would
    carry requests that must each be decided (Host fronting on a shared address), so it is refused
    (and recorded) before anything is looked up; a new connection gets it."""
    gate = _gate(tmp_path, 443, 80)  # 127.0.0.1:80 is allowed: only the front end's rule stops it
    try:
        sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        sock.sendall(b"CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n")
        assert recv_head(sock).startswith(b"HTTP/1.1 403")
        sock.sendall(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n")
        rest = recv_head(sock)
        sock.close()
        assert rest.startswith(b"HTTP/1.1 403")
        assert b"first request on its connection" in rest
        assert [(d.kind, d.decision, d.reason) for d in gate.decisions][1:] == [
            ("connect", Verdict.DENY, Reason.UNSUPPORTED)
        ]
    finally:
        gate.stop()


def test_a_request_line_in_pieces_is_still_served(
    tmp_path: Path, half_close: HalfCloseUpstream
) -> None:
    """A CONNECT line that arrives in pieces is left to mitmproxy rather than polled for (whichever
    path serves it, the tunnel works and is checked)."""
    gate = _gate(tmp_path, half_close.port)
    try:
        sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        sock.sendall(b"CONN")
        time.sleep(0.2)
        sock.sendall(f"ECT 127.0.0.1:{half_close.port} HTTP/1.1\r\n\r\n".encode())
        assert recv_head(sock).startswith(b"HTTP/1.1 200")
        hello = client_hello(None)
        sock.sendall(hello)
        sock.close()
        wait_until(lambda: half_close.received == hello)
        assert half_close.received == hello
    finally:
        gate.stop()


class _Counted:
    bytes_in = 0
    bytes_out = 0


class _FailingRecords:
    """A checkpoint whose record of the idle closing raises (a failing write-ahead sink)."""

    def __init__(self) -> None:
        self.refusals = 0

    def refuse_connection(self, conn: object, reason: Reason, detail: str) -> None:
        self.refusals += 1
        raise RuntimeError("the journal's sink failed")


def test_an_idle_tunnel_is_closed_even_when_recording_the_closing_fails() -> None:
    """The idle check runs as a timer on the loop: an error while recording the closing must not
    leave the tunnel relaying with no idle limit (fail closed)."""
    import asyncio

    from addons.tunnels import TunnelFrontEnd
    from proxy.runtime import sockio

    client, client_peer = socket.socketpair()
    up, up_peer = socket.socketpair()
    for sock in (client, client_peer, up, up_peer):
        sock.setblocking(False)
    records = _FailingRecords()
    errors: list[object] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context.get("exception")))
        front = TunnelFrontEnd(
            records,  # type: ignore[arg-type]
            request_deadline=5,
            handoff=None,  # type: ignore[arg-type]
            idle_timeout=0.2,
        )
        watches = sockio.Watch(client), sockio.Watch(up)
        await asyncio.wait_for(front._relay(client, up, _Counted(), *watches), WAIT)  # type: ignore[arg-type]

    try:
        asyncio.run(main())
        assert records.refusals == 1
        assert [type(e) for e in errors] == [RuntimeError]  # logged by the loop, not swallowed
        client_peer.setblocking(True)
        client_peer.settimeout(WAIT)
        assert client_peer.recv(1) == b""  # the client's side was shut
    finally:
        for sock in (client, client_peer, up, up_peer):
            sock.close()


def test_a_client_pipelining_refused_connects_does_not_hold_the_gate(tmp_path: Path) -> None:
    """Refusals need no upstream and the client's bytes are already there: without a turn of the
    loop every few of them, one connection's 4,000 pipelined refused CONNECTs would all be decided
    before the gate even accepted another client (seconds for 100,000, every sandbox stalled)."""
    gate = _gate(tmp_path, 9)
    try:
        count = 8000
        flood = b"CONNECT 10.9.9.9:443 HTTP/1.1\r\nHost: 10.9.9.9:443\r\n\r\n"
        probe = b"CONNECT 10.8.8.8:443 HTTP/1.1\r\nHost: 10.8.8.8:443\r\n\r\n"
        assert answered_during_a_flood(gate, flood, count, probe, "10.8.8.8") < count // 2
    finally:
        gate.stop()
