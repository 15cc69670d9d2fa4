"""Threat classes 5, 6, 7 and 12: fronting, non-TLS in TLS tunnels, ports, and header spoofing.

Fronting means getting an allowed tunnel or connection to carry traffic for another host: a ClientHello
naming another server, an absolute-form URL whose authority and Host disagree, a second request on a
kept-alive connection, a foreign Host inside a CONNECT to port 80. The gate relays allowed TLS untouched
(no interception), so the first bytes of every tunnel are all it can judge: they must be a ClientHello
for the CONNECT host (or SSH on port 22, or HTTP whose every request names the CONNECT host on port 80).

Tunnels to port 80 and 22 need canaries on exactly those ports; they listen on a random 127.x.y.z so
parallel runs do not collide, and the tests skip where binding a low port is not permitted.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from proxy.core.decision import Reason, Verdict
from tests.dnsfake import FakeDns
from tests.harness import WAIT, RunningGate, Upstream, recv_head, wait_until
from tests.security import (
    CountingListener,
    client_hello,
    exchange,
    fresh_decisions,
    random_loopback,
    start_gate_with,
)

pytestmark = pytest.mark.timeout(60)

WEB_IP = random_loopback()


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.loopback("allowed.test", "evil.test", "sub.allowed.test", "evilallowed.test")
        server.set("web.test", "A", [WEB_IP])
        yield server


def _listener(port: int) -> Iterator[Upstream]:
    try:
        listener = CountingListener(WEB_IP, port)
    except OSError as exc:
        pytest.skip(f"cannot bind {WEB_IP}:{port} for the canary: {exc}")
    yield listener
    listener.stop()


@pytest.fixture(scope="module")
def web80() -> Iterator[Upstream]:
    yield from _listener(80)


@pytest.fixture(scope="module")
def ssh22() -> Iterator[Upstream]:
    yield from _listener(22)


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory, dns: FakeDns, plain: Upstream, tls: Upstream
) -> Iterator[RunningGate]:
    running = start_gate_with(
        tmp_path_factory.mktemp("fronting"),
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: allowed
            hosts: [allowed.test]
            ports: [{plain.port}, {tls.port}]
          - name: web
            hosts: [web.test]
            ports: [80, 22]
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


def _reset_listener(listener: Upstream) -> Upstream:
    listener.accepted = 0
    listener.bytes_received = 0
    listener.heads.clear()
    return listener


def _connect(host: str, port: int) -> bytes:
    return f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


# -- class 5: SNI fronting -------------------------------------------------------------------------


ECH = struct.pack("!HH", 0xFE0D, 4) + b"\x00\x00\x01\x02"


@pytest.mark.parametrize(
    ("sni", "extension", "reason"),
    [
        ("evil.test", b"", Reason.SNI_MISMATCH),
        ("allowed.test.evil.test", b"", Reason.SNI_MISMATCH),
        ("evilallowed.test", b"", Reason.SNI_MISMATCH),
        ("sub.allowed.test", b"", Reason.SNI_MISMATCH),
        ("127.0.0.1", b"", Reason.SNI_MISSING),  # Python sends no SNI for an address
        (None, b"", Reason.SNI_MISSING),
        ("allowed.test", ECH, Reason.ECH_REFUSED),
    ],
    ids=["foreign", "suffix-trap", "no-dot-trap", "subdomain", "ip-as-sni", "no-sni", "ech"],
)
def test_tunnel_whose_client_hello_does_not_name_the_connect_host_is_closed(
    gate: RunningGate,
    dns: FakeDns,
    tls: Upstream,
    sni: str | None,
    extension: bytes,
    reason: Reason,
) -> None:
    before = len(gate.decisions)
    reply = exchange(gate, _connect("allowed.test", tls.port), client_hello(sni, extension))
    assert reply.data == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert reply.closed
    assert tls.accepted == 0 and tls.bytes_received == 0
    assert {q[0] for q in dns.queries} <= {"allowed.test"}  # the SNI name is never resolved
    connect, hello = fresh_decisions(gate, before)
    assert connect.decision is Verdict.ALLOW
    assert (hello.kind, hello.decision, hello.reason) == ("tls", Verdict.DENY, reason)


def test_matching_client_hello_reaches_the_upstream(gate: RunningGate, tls: Upstream) -> None:
    """Control for the SNI table: only the SNI differs, and this one goes through."""
    reply = exchange(
        gate, _connect("allowed.test", tls.port), client_hello("allowed.test"), tunnel_reply=True
    )
    assert reply.tunnel_bytes()[:2] == b"\x16\x03"  # the upstream's ServerHello
    assert tls.accepted == 1


# -- class 5: plain-HTTP fronting -----------------------------------------------------------------


def _get(url_authority: str, host_header: str | None, path: str = "/") -> bytes:
    head = f"GET http://{url_authority}{path} HTTP/1.1\r\n"
    if host_header is not None:
        head += f"Host: {host_header}\r\n"
    return (head + "\r\n").encode()


def test_host_header_naming_another_host_is_refused(
    gate: RunningGate, dns: FakeDns, plain: Upstream
) -> None:
    before = len(gate.decisions)
    reply = exchange(gate, _get(f"allowed.test:{plain.port}", f"evil.test:{plain.port}"))
    assert reply.status == 403
    assert reply.header("x-egress-reason") == "host-mismatch"
    assert plain.accepted == 0
    assert dns.count("evil.test") == 0
    (decision,) = fresh_decisions(gate, before)
    assert decision.reason == Reason.HOST_MISMATCH


def test_host_header_in_another_spelling_of_the_same_host_is_allowed(
    gate: RunningGate, plain: Upstream
) -> None:
    reply = exchange(gate, _get(f"allowed.test:{plain.port}", f"ALLOWED.test.:{plain.port}"))
    assert reply.status == 200
    assert plain.accepted == 1


def test_duplicate_host_headers_are_refused(
    gate: RunningGate, dns: FakeDns, plain: Upstream
) -> None:
    port = plain.port
    request = (
        f"GET http://allowed.test:{port}/ HTTP/1.1\r\n"
        f"Host: allowed.test:{port}\r\nHost: evil.test\r\n\r\n"
    ).encode()
    before = len(gate.decisions)
    reply = exchange(gate, request)
    assert reply.status == 403
    assert plain.accepted == 0
    (decision,) = fresh_decisions(gate, before)
    assert decision.reason == Reason.HOST_MISMATCH


@pytest.mark.parametrize("suffix", [":1", ":80, evil.test", ":x@evil.test"])
def test_host_header_port_part_must_be_a_port_equal_to_the_url_port(
    gate: RunningGate, plain: Upstream, suffix: str
) -> None:
    reply = exchange(gate, _get(f"allowed.test:{plain.port}", f"allowed.test{suffix}"))
    assert reply.status == 403
    assert plain.accepted == 0


def test_second_request_on_a_kept_alive_connection_is_decided_again(
    gate: RunningGate, dns: FakeDns, plain: Upstream
) -> None:
    port = plain.port
    before = len(gate.decisions)
    reply = exchange(
        gate,
        _get(f"allowed.test:{port}", f"allowed.test:{port}", "/first")
        + _get(f"evil.test:{port}", f"evil.test:{port}", "/second")
        + _get(f"127.0.0.1:{port}", f"127.0.0.1:{port}", "/pinned-address"),
        responses=3,
    )
    assert reply.statuses() == [200, 403, 403]
    assert [target for _, target, _ in plain.requests] == ["/first"]
    assert plain.accepted == 1
    assert dns.count("evil.test") == 0
    reasons = [d.reason for d in fresh_decisions(gate, before)]
    # The address allowed.test was pinned to is not thereby open: 127.0.0.1 has no rule of its own.
    assert reasons == [Reason.ALLOWED_BY_RULE, Reason.NO_MATCHING_RULE, Reason.NO_MATCHING_RULE]


def test_https_scheme_in_absolute_form_is_not_proxied_as_plain_http(
    gate: RunningGate, tls: Upstream
) -> None:
    request = (
        f"GET https://allowed.test:{tls.port}/ HTTP/1.1\r\nHost: allowed.test:{tls.port}\r\n\r\n"
    )
    before = len(gate.decisions)
    reply = exchange(gate, request.encode())
    assert reply.status == 403
    assert tls.accepted == 0
    (decision,) = fresh_decisions(gate, before)
    assert decision.reason == Reason.UNSUPPORTED


# -- class 5: inside a CONNECT to port 80 ----------------------------------------------------------


def test_port80_tunnel_checks_every_request_host(
    gate: RunningGate, dns: FakeDns, web80: Upstream
) -> None:
    listener = _reset_listener(web80)
    before = len(gate.decisions)
    reply = exchange(
        gate,
        _connect("web.test", 80),
        b"GET /1 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        responses=2,
    )
    assert reply.statuses() == [200, 200, 403]  # CONNECT, first request, refusal
    assert [h.split(b"\r\n")[0] for h in listener.heads] == [b"GET /1 HTTP/1.1"]
    assert dns.count("evil.test") == 0
    reasons = [(d.kind, d.reason) for d in fresh_decisions(gate, before)]
    assert reasons == [
        ("connect", Reason.ALLOWED_BY_RULE),
        ("http", Reason.ALLOWED_BY_RULE),
        ("http", Reason.HOST_MISMATCH),
    ]


def test_port80_tunnel_refuses_a_nested_connect(gate: RunningGate, web80: Upstream) -> None:
    listener = _reset_listener(web80)
    reply = exchange(gate, _connect("web.test", 80), _connect("evil.test", 443))
    assert reply.status in (400, 403)
    assert listener.accepted == 0


def test_port80_tunnel_refuses_absolute_form_naming_another_host(
    gate: RunningGate, web80: Upstream
) -> None:
    listener = _reset_listener(web80)
    before = len(gate.decisions)
    reply = exchange(
        gate, _connect("web.test", 80), b"GET http://evil.test/ HTTP/1.1\r\nHost: web.test\r\n\r\n"
    )
    assert reply.status == 403
    assert listener.heads == []
    assert fresh_decisions(gate, before)[-1].reason == Reason.HOST_MISMATCH


# -- class 6: non-TLS inside TLS tunnels, TLS inside port 22 ---------------------------------------


OVERSIZED_HELLO = (
    b"\x16\x03\x01\x40\x00\x01\x00\xff\xff"
    + b"A" * (0x4000 - 4)
    + b"".join(b"\x16\x03\x01\x40\x00" + b"A" * 0x4000 for _ in range(5))
)


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x80\x2e\x01\x00\x02\x00\x15" + b"\x00" * 0x2C,  # SSLv2-style hello
        b"\x17\x03\x03\x00\x10" + b"\x00" * 16,  # application data before any handshake
        OVERSIZED_HELLO,
    ],
    ids=["http-foreign-host", "http-same-host", "ssh", "sslv2", "appdata", "oversized-hello"],
)
def test_tls_port_tunnel_carrying_anything_but_a_client_hello_is_closed(
    gate: RunningGate, tls: Upstream, payload: bytes
) -> None:
    before = len(gate.decisions)
    reply = exchange(gate, _connect("allowed.test", tls.port), payload)
    assert reply.closed
    assert reply.data == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert tls.accepted == 0 and tls.bytes_received == 0
    last = fresh_decisions(gate, before)[-1]
    assert (last.kind, last.decision, last.reason) == ("tls", Verdict.DENY, Reason.NOT_TLS)


def test_incomplete_client_hello_is_never_relayed(gate: RunningGate, tls: Upstream) -> None:
    """A record header that promises a handshake and never delivers one: the gate waits for more
    (bounded by its 64 KiB cap) and relays nothing meanwhile."""
    reply = exchange(gate, _connect("allowed.test", tls.port), b"\x16\x03\x01\x00\x05hello")
    assert reply.data == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert tls.accepted == 0


@pytest.mark.parametrize(
    "payload",
    [client_hello("web.test"), b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n", b"\x00" * 8],
    ids=["tls", "http", "zeros"],
)
def test_port22_tunnel_must_carry_ssh(gate: RunningGate, ssh22: Upstream, payload: bytes) -> None:
    listener = _reset_listener(ssh22)
    before = len(gate.decisions)
    reply = exchange(gate, _connect("web.test", 22), payload)
    assert reply.closed
    assert listener.accepted == 0 and listener.bytes_received == 0
    last = fresh_decisions(gate, before)[-1]
    assert (last.kind, last.reason) == ("tls", Reason.NOT_TLS)


def test_port22_tunnel_with_ssh_banner_is_relayed(gate: RunningGate, ssh22: Upstream) -> None:
    """Control for the port-22 table: an SSH identification string goes through untouched."""
    listener = _reset_listener(ssh22)
    banner = b"SSH-2.0-OpenSSH_9.6\r\n"
    with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as sock:
        sock.sendall(_connect("web.test", 22))
        assert recv_head(sock) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sock.sendall(banner)
        # Held open until the listener has the banner (the gate dials and relays after reading it).
        wait_until(lambda: listener.bytes_received >= len(banner))
    assert listener.accepted == 1
    assert listener.bytes_received == len(banner)


# -- class 7: ports --------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [22, 25, 443, 8443, 65535])
def test_connect_to_an_allowed_host_on_an_unlisted_port_is_refused(
    gate: RunningGate, dns: FakeDns, port: int
) -> None:
    before = len(gate.decisions)
    reply = exchange(gate, _connect("allowed.test", port))
    assert reply.status == 403
    assert reply.header("x-egress-reason") == "port-not-allowed"
    assert reply.header("x-egress-rule") == "allowed"
    assert dns.queries == []
    (decision,) = fresh_decisions(gate, before)
    assert (decision.reason, decision.port) == (Reason.PORT_NOT_ALLOWED, port)


def test_plain_http_to_an_unlisted_port_is_refused(
    gate: RunningGate, dns: FakeDns, plain: Upstream
) -> None:
    reply = exchange(gate, _get("allowed.test:8080", "allowed.test:8080"))
    assert reply.status == 403
    assert reply.header("x-egress-reason") == "port-not-allowed"
    assert dns.queries == [] and plain.accepted == 0


@pytest.mark.parametrize("authority", ["allowed.test:0", "allowed.test:65536", "allowed.test:-1"])
def test_impossible_ports_never_reach_dns(gate: RunningGate, dns: FakeDns, authority: str) -> None:
    before = len(gate.decisions)
    reply = exchange(gate, f"CONNECT {authority} HTTP/1.1\r\n\r\n".encode())
    assert reply.status in (400, 403)
    assert dns.queries == []
    assert not [d for d in fresh_decisions(gate, before) if d.allowed]


# -- class 12: header spoofing ---------------------------------------------------------------------


def test_client_sent_egress_headers_never_reach_the_upstream(
    gate: RunningGate, plain: Upstream
) -> None:
    port = plain.port
    request = (
        f"GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
        "X-Egress-Decision: allow\r\nx-egress-rule: forged\r\nX-EGRESS-REASON: forged\r\n"
        "X-Egress-Sandbox-Id: someone-else\r\n\r\n"
    )
    reply = exchange(gate, request.encode())
    assert reply.status == 200
    ((_, _, headers),) = plain.requests
    assert [k for k in headers if "egress" in k] == []


def test_client_sent_egress_headers_are_stripped_inside_port80_tunnels(
    gate: RunningGate, web80: Upstream
) -> None:
    listener = _reset_listener(web80)
    exchange(
        gate,
        _connect("web.test", 80),
        b"GET / HTTP/1.1\r\nHost: web.test\r\nX-Egress-Decision: allow\r\n\r\n",
    )
    (head,) = listener.heads
    assert b"egress" not in head.lower()


def test_underscore_spelling_of_egress_headers_is_stripped(
    gate: RunningGate, plain: Upstream
) -> None:
    port = plain.port
    request = (
        f"GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
        "X_Egress_Decision: allow\r\n\r\n"
    )
    assert exchange(gate, request.encode()).status == 200
    ((_, _, headers),) = plain.requests
    assert [k for k in headers if "egress" in k] == []


def test_proxy_credentials_are_not_forwarded_upstream(gate: RunningGate, plain: Upstream) -> None:
    port = plain.port
    request = (
        f"GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n"
        "Proxy-Authorization: Basic c2FuZGJveDpzZWNyZXQ=\r\n\r\n"
    )
    assert exchange(gate, request.encode()).status == 200
    ((_, _, headers),) = plain.requests
    assert "proxy-authorization" not in headers


def test_proxy_credentials_are_not_forwarded_inside_port80_tunnels(
    gate: RunningGate, web80: Upstream
) -> None:
    listener = _reset_listener(web80)
    exchange(
        gate,
        _connect("web.test", 80),
        b"GET / HTTP/1.1\r\nHost: web.test\r\nProxy-Authorization: Basic c2VjcmV0\r\n\r\n",
    )
    (head,) = listener.heads
    assert b"proxy-authorization" not in head.lower()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (client_hello("evil.test"), Reason.SNI_MISMATCH),
        (b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n", Reason.NOT_TLS),
        (b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n", Reason.NOT_TLS),
    ],
    ids=["foreign-sni", "plain-http", "second-connect"],
)
def test_tunnel_bytes_pipelined_with_the_connect_are_judged_the_same(
    gate: RunningGate, tls: Upstream, payload: bytes, reason: Reason
) -> None:
    """Bytes sent in the same segment as the CONNECT, before its 200 arrived, get no shortcut."""
    before = len(gate.decisions)
    reply = exchange(gate, _connect("allowed.test", tls.port) + payload)
    assert reply.closed
    assert tls.accepted == 0 and tls.bytes_received == 0
    assert fresh_decisions(gate, before)[-1].reason == reason
