"""The gate end to end: a real mitmproxy-based gate, real curl, counting upstreams on loopback.

Every refusal is checked three ways: the client sees the refusal, the counting upstream saw zero
connections (and, where a name is involved, the DNS server saw zero queries), and a decision with the
expected reason was recorded.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.core.checkpoint import Checkpoint
from proxy.core.decision import Decision, Reason, Verdict
from proxy.core.limits import Limits
from tests.dnsfake import FakeDns
from tests.harness import WAIT, LocalCA, RunningGate, Upstream, client_hello, curl, wait_until

pytestmark = pytest.mark.timeout(60)


def _policy(write_policy: Callable[[str], Path], *ports: int, extra: str = "") -> Path:
    port_list = ", ".join(str(p) for p in ports)
    return write_policy(
        f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: test-allowed
            hosts: [allowed.test]
            ports: [{port_list}]
          - name: blocked-sub
            action: deny
            hosts: ["*.blocked.test"]
        {extra}
        """
    )


@pytest.fixture
def gate_for(
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    fake_dns: FakeDns,
) -> Callable[..., RunningGate]:
    def make(*ports: int, extra: str = "") -> RunningGate:
        for name in ("allowed.test", "evil.test", "x.blocked.test", "other.test"):
            fake_dns.set(name, "A", ["127.0.0.1"])
        return start_gate(_policy(write_policy, *ports, extra=extra))

    return make


def _last(gate: RunningGate, kind: str | None = None) -> Decision:
    decisions = [d for d in gate.decisions if kind is None or d.kind == kind]
    assert decisions, "no decision was recorded"
    return decisions[-1]


def _connect(gate: RunningGate, authority: str) -> tuple[socket.socket, bytes]:
    """Open a raw CONNECT tunnel through the gate; returns the socket and the proxy's response head."""
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    sock.settimeout(WAIT)
    try:
        for _ in range(1000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


# -- allowed traffic -------------------------------------------------------------------------------


def test_allowed_https_passes_through_untouched(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream, test_ca: LocalCA
) -> None:
    gate = gate_for(tls_upstream.port)
    result = curl(
        f"https://allowed.test:{tls_upstream.port}/hello", gate.url, cacert=test_ca.ca_path
    )
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    assert "hello from tls-upstream: GET /hello host=allowed.test" in result.body
    assert tls_upstream.accepted == 1
    # The upstream's own certificate reached curl: the gate did not intercept TLS.
    kinds = [(d.kind, d.decision, d.reason) for d in gate.decisions]
    assert ("connect", Verdict.ALLOW, Reason.ALLOWED_BY_RULE) in kinds
    assert ("tls", Verdict.ALLOW, Reason.ALLOWED_BY_RULE) in kinds
    assert _last(gate, "connect").address == "127.0.0.1"
    assert _last(gate, "connect").rule == "test-allowed"


def test_allowed_plain_http_and_keepalive_reuses_one_upstream_connection(
    gate_for: Callable[..., RunningGate], http_upstream: Upstream
) -> None:
    gate = gate_for(http_upstream.port)
    urls = [f"http://allowed.test:{http_upstream.port}/r{i}" for i in range(12)]
    args: list[str] = []
    for url in urls[1:]:
        args += ["-o", "-", url]
    result = curl(urls[0], gate.url, *args)
    assert result.returncode == 0, result.stderr
    assert result.body.count("hello from http-upstream") == 12
    # Pinning must not break connection reuse (more than mitmproxy's 5-per-address semaphore).
    assert http_upstream.accepted == 1
    assert len(http_upstream.requests) == 12
    assert all(
        h.get("host") == f"allowed.test:{http_upstream.port}" for _, _, h in http_upstream.requests
    )


def test_client_sent_egress_headers_are_stripped(
    gate_for: Callable[..., RunningGate], http_upstream: Upstream
) -> None:
    gate = gate_for(http_upstream.port)
    result = curl(
        f"http://allowed.test:{http_upstream.port}/",
        gate.url,
        "-H",
        "X-Egress-Decision: allow",
        "-H",
        "x-egress-rule: forged",
    )
    assert result.status == 200
    (_, _, headers) = http_upstream.requests[-1]
    assert not [k for k in headers if k.startswith("x-egress-")]


# -- refused traffic ---------------------------------------------------------------------------------


def test_denied_connect_gets_403_with_reason_and_leaks_nothing(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream, fake_dns: FakeDns
) -> None:
    gate = gate_for(tls_upstream.port)
    fake_dns.reset_queries()
    sock, head = _connect(gate, f"evil.test:{tls_upstream.port}")
    body = _read_body(sock, head)
    sock.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert b"X-Egress-Decision: deny" in head
    assert b"X-Egress-Reason: no-matching-rule" in head
    assert b"X-Egress-Rule: -" in head
    text = body.decode()
    assert "evil.test" in text and "restricted by policy" in text and "add a rule" in text
    assert tls_upstream.accepted == 0
    assert fake_dns.count("evil.test") == 0
    decision = _last(gate, "connect")
    assert (decision.decision, decision.reason, decision.host) == (
        Verdict.DENY,
        Reason.NO_MATCHING_RULE,
        "evil.test",
    )


def test_denied_by_rule_and_port_not_allowed(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream
) -> None:
    gate = gate_for(tls_upstream.port)
    sock, head = _connect(gate, f"x.blocked.test:{tls_upstream.port}")
    sock.close()
    assert b"X-Egress-Reason: denied-by-rule" in head
    assert b"X-Egress-Rule: blocked-sub" in head
    sock, head = _connect(gate, "allowed.test:22")
    sock.close()
    assert b"X-Egress-Reason: port-not-allowed" in head
    assert b"X-Egress-Rule: test-allowed" in head
    assert tls_upstream.accepted == 0


def test_curl_sees_refusal_for_denied_https(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream, test_ca: LocalCA
) -> None:
    gate = gate_for(tls_upstream.port)
    result = curl(f"https://evil.test:{tls_upstream.port}/", gate.url, cacert=test_ca.ca_path)
    assert result.returncode != 0
    assert "403" in result.stderr or result.status == 403
    assert tls_upstream.accepted == 0


def test_denied_plain_http_gets_403_body(
    gate_for: Callable[..., RunningGate], http_upstream: Upstream
) -> None:
    gate = gate_for(http_upstream.port)
    result = curl(f"http://evil.test:{http_upstream.port}/secret?token=abc", gate.url)
    assert result.status == 403
    assert result.headers["x-egress-reason"] == "no-matching-rule"
    assert "evil.test" in result.body and "restricted by policy" in result.body
    assert "token=abc" not in result.body  # query strings never echo into logs or messages
    assert http_upstream.accepted == 0
    assert _last(gate, "http").path == "/secret"


def test_host_header_disagreeing_with_url_is_refused(
    gate_for: Callable[..., RunningGate], http_upstream: Upstream
) -> None:
    gate = gate_for(http_upstream.port)
    result = curl(f"http://allowed.test:{http_upstream.port}/", gate.url, "-H", "Host: evil.test")
    assert result.status == 403
    assert result.headers["x-egress-reason"] == "host-mismatch"
    assert http_upstream.accepted == 0


# -- tunnel contents ----------------------------------------------------------------------------------


def _tls_in_tunnel(gate: RunningGate, port: int, server_hostname: str | None) -> bytes:
    sock, head = _connect(gate, f"allowed.test:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, OSError)):
        tls = ctx.wrap_socket(sock, server_hostname=server_hostname)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        tls.recv(100) or (_ for _ in ()).throw(ConnectionResetError("closed"))
    sock.close()
    return head


def test_sni_mismatch_is_refused_with_zero_upstream_bytes(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream
) -> None:
    gate = gate_for(tls_upstream.port)
    _tls_in_tunnel(gate, tls_upstream.port, "evil.test")
    assert tls_upstream.accepted == 0 and tls_upstream.bytes_received == 0
    decision = _last(gate, "tls")
    assert (decision.decision, decision.reason, decision.sni) == (
        Verdict.DENY,
        Reason.SNI_MISMATCH,
        "evil.test",
    )


def test_missing_sni_is_refused(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream
) -> None:
    gate = gate_for(tls_upstream.port)
    _tls_in_tunnel(gate, tls_upstream.port, None)
    assert tls_upstream.accepted == 0 and tls_upstream.bytes_received == 0
    assert _last(gate, "tls").reason == Reason.SNI_MISSING


def test_plain_bytes_in_tls_tunnel_are_refused(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream
) -> None:
    gate = gate_for(tls_upstream.port)
    sock, head = _connect(gate, f"allowed.test:{tls_upstream.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert _read_until_closed(sock) == b""
    sock.close()
    assert tls_upstream.accepted == 0 and tls_upstream.bytes_received == 0
    assert _last(gate, "tls").reason == Reason.NOT_TLS


def test_encrypted_client_hello_is_refused(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream
) -> None:
    gate = gate_for(tls_upstream.port)
    ech = struct.pack("!HH", 0xFE0D, 4) + b"\x00\x00\x01\x02"
    hello = client_hello("allowed.test", ech)
    sock, head = _connect(gate, f"allowed.test:{tls_upstream.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(hello)
    assert _read_until_closed(sock) == b""
    sock.close()
    assert tls_upstream.accepted == 0
    assert _last(gate, "tls").reason == Reason.ECH_REFUSED


def test_same_hello_without_ech_is_allowed(
    gate_for: Callable[..., RunningGate], tls_upstream: Upstream
) -> None:
    """Control for the ECH test: the hand-built hello differs only by the ECH extension."""
    gate = gate_for(tls_upstream.port)
    sock, head = _connect(gate, f"allowed.test:{tls_upstream.port}")
    assert head.startswith(b"HTTP/1.1 200")
    sock.sendall(client_hello("allowed.test"))
    sock.settimeout(WAIT)
    reply = sock.recv(5)
    sock.close()
    assert reply[:1] == b"\x16"  # the upstream's ServerHello came back through the tunnel
    assert tls_upstream.accepted == 1


def _read_body(sock: socket.socket, head: bytes) -> bytes:
    header, _, rest = head.partition(b"\r\n\r\n")
    length = 0
    for line in header.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    sock.settimeout(WAIT)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return rest


# -- shared gate: per-sandbox identities ----------------------------------------------------------------


def test_shared_gate_requires_a_sandbox_credential_and_applies_its_policy(
    write_policy: Callable[[str], Path],
    start_gate: Callable[..., RunningGate],
    fake_dns: FakeDns,
    http_upstream: Upstream,
    tmp_path: Path,
) -> None:
    from proxy.policy.identities import Identities, token_digest
    from proxy.policy.loader import load_policy

    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    port = http_upstream.port
    open_policy = _policy(write_policy, port)
    closed = write_policy("version: 1\nrules:\n  - name: nothing\n    hosts: [nothing.test]\n")
    sandboxes = tmp_path / "sandboxes.yaml"
    sandboxes.write_text(
        "version: 1\nsandboxes:\n"
        f"  - id: alpha\n    token_sha256: {token_digest('tok-a')}\n"
        f"  - id: beta\n    token_sha256: {token_digest('tok-b')}\n    policy: {closed.name}\n"
    )
    beta_policy = load_policy(closed)
    gate = start_gate(
        open_policy,
        gate_kwargs={
            "identities": Identities.load(sandboxes),
            "sandbox_policies": {"beta": lambda: beta_policy},
        },
    )
    url = f"http://allowed.test:{port}/x"

    anonymous = curl(url, gate.url)
    assert anonymous.status == 407
    assert anonymous.headers["x-egress-reason"] == "proxy-auth-required"
    forged = curl(url, gate.url, "--proxy-user", "alpha:tok-b")
    assert forged.status == 407
    assert http_upstream.accepted == 0

    alpha = curl(url, gate.url, "--proxy-user", "alpha:tok-a")
    assert alpha.status == 200
    assert _last(gate, "http").sandbox_id == "alpha"
    (_, _, headers) = http_upstream.requests[-1]
    assert "proxy-authorization" not in headers  # the credential never travels upstream

    beta = curl(url, gate.url, "--proxy-user", "beta:tok-b")
    assert beta.status == 403  # beta's own policy does not list allowed.test
    decision = _last(gate, "http")
    assert (decision.sandbox_id, decision.reason) == ("beta", Reason.NO_MATCHING_RULE)
    assert decision.policy_version == beta_policy.version
    assert http_upstream.accepted == 1


# -- resource limits (threat 13) --------------------------------------------------------------------


def _limited_gate(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, port: int, **config: object
) -> RunningGate:
    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    return RunningGate(_policy(write_policy, port), [fake_dns.nameserver], config=config).start()


def _is_closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_per_client_are_capped_and_recorded(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, http_upstream: Upstream
) -> None:
    gate = _limited_gate(
        write_policy, fake_dns, http_upstream.port, limits=Limits(max_connections_per_client=4)
    )
    try:
        held = [socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) for _ in range(4)]
        extra = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        assert _is_closed(extra, WAIT)
        assert not _is_closed(held[0], 0.2)
        refused = [d for d in gate.decisions if d.reason == Reason.CONNECTION_LIMIT]
        assert len(refused) == 1 and refused[0].decision == Verdict.DENY
        held.pop().close()
        url = f"http://allowed.test:{http_upstream.port}/"
        # the gate frees the slot once it sees the close
        assert wait_until(lambda: curl(url, gate.url, timeout=2).status == 200), (
            "a freed slot was never reusable"
        )
        for sock in [*held, extra]:
            sock.close()
    finally:
        gate.stop()
    assert http_upstream.accepted == 1


def test_silent_and_dribbling_connections_are_closed_at_the_deadline(
    write_policy: Callable[[str], Path], fake_dns: FakeDns, tls_upstream: Upstream
) -> None:
    gate = _limited_gate(
        write_policy, fake_dns, tls_upstream.port, limits=Limits(request_timeout=1.0)
    )
    try:
        dribble = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        dribble.sendall(b"GET http://allowed.test/ HTTP/1.1\r\nX-Slow: ")
        silent_tunnel, head = _connect(gate, f"allowed.test:{tls_upstream.port}")
        assert head.startswith(b"HTTP/1.1 200")
        assert _is_closed(dribble, WAIT)
        assert _is_closed(silent_tunnel, WAIT)
        dribble.close()
        silent_tunnel.close()
        timeouts = [d for d in gate.decisions if d.reason == Reason.REQUEST_TIMEOUT]
        assert len(timeouts) == 2
        assert {d.kind for d in timeouts} == {"connect", "tls"}
        # A client that does its work in time is untouched by the deadline.
        ok = curl(f"https://allowed.test:{tls_upstream.port}/", gate.url, "-k")
        assert ok.status == 200
    finally:
        gate.stop()
    assert tls_upstream.accepted == 1  # the silent tunnel never opened an upstream connection


# -- a hook that raises fails closed ------------------------------------------------------------


@pytest.fixture
def inspecting_gate(
    tmp_path: Path, fake_dns: FakeDns, test_ca: LocalCA
) -> Iterator[tuple[RunningGate, Upstream]]:
    """A gate reading the requests of allowed.test (GET anywhere, a JSON POST by its body), whose
    upstream is a counting TLS server trusted through the test CA."""
    from tests.security import inspecting, start_gate_with

    fake_dns.set("allowed.test", "A", ["127.0.0.1"])
    upstream = Upstream("inspected", tls=test_ca.server_context())
    policy = f"""
        version: 1
        allow_internal: [127.0.0.0/8]
        rules:
          - name: reads
            hosts: [allowed.test]
            ports: [{upstream.port}]
            methods: [GET]
          - name: lfs-download
            hosts: [allowed.test]
            ports: [{upstream.port}]
            methods: [POST]
            json_body: {{operation: download}}
        """
    gate = start_gate_with(
        tmp_path, policy, fake_dns.nameserver, config=inspecting(tmp_path, test_ca)
    )
    try:
        yield gate, upstream
    finally:
        gate.stop()
        upstream.stop()


def _inspected(gate: RunningGate, port: int) -> ssl.SSLSocket:
    sock, head = _connect(gate, f"allowed.test:{port}")
    assert head.startswith(b"HTTP/1.1 200"), head
    ca = gate.ca
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(
        sock, server_hostname="allowed.test"
    )


def _exchange(sock: ssl.SSLSocket, request: bytes) -> bytes:
    sock.sendall(request)
    try:
        return _read_until_closed(sock)
    except OSError:
        return b""


def _failing(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
    async def fails(self: Checkpoint, conn: Any, request: Any, **kwargs: Any) -> Any:
        if request.method == method:
            raise RuntimeError("a fault in the decision")
        return await original(self, conn, request, **kwargs)

    return fails


def test_a_request_whose_decision_raises_is_stopped_not_sent(
    inspecting_gate: tuple[RunningGate, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """mitmproxy logs an exception in a hook and carries on: the request would go to the tunnel's
    pinned upstream undecided and unrecorded. It is killed and the refusal recorded instead."""
    gate, upstream = inspecting_gate
    monkeypatch.setattr(Checkpoint, "admit_request", _failing("DELETE", Checkpoint.admit_request))
    authority = f"allowed.test:{upstream.port}"
    tls = _inspected(gate, upstream.port)
    reply = _exchange(tls, f"DELETE /x HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert reply == b""  # no response at all: the client's connection is closed
    assert upstream.requests == [] and upstream.accepted == 0
    last = _last(gate)
    assert (last.decision, last.reason) == (Verdict.DENY, Reason.UNSUPPORTED)
    assert "RuntimeError" in (last.detail or "")
    # control: the same tunnel's other requests still work, on a new connection
    tls = _inspected(gate, upstream.port)
    tls.sendall(f"GET /x HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
    assert _read_until_closed(tls).startswith(b"HTTP/1.1 200")


def test_a_held_body_whose_decision_raises_is_never_sent(
    inspecting_gate: tuple[RunningGate, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, upstream = inspecting_gate
    monkeypatch.setattr(Checkpoint, "admit_body", _failing("POST", Checkpoint.admit_body))
    body = b'{"operation": "download"}'
    tls = _inspected(gate, upstream.port)
    reply = _exchange(
        tls,
        f"POST /lfs HTTP/1.1\r\nHost: allowed.test:{upstream.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    assert reply == b""
    assert upstream.requests == [] and upstream.accepted == 0
    assert _last(gate).reason is Reason.UNSUPPORTED


def test_a_dial_whose_check_raises_is_not_made(
    inspecting_gate: tuple[RunningGate, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``server_connect`` is the last line: if checking the dial raises, nothing is dialled."""
    gate, upstream = inspecting_gate

    def fails(conn: Any, host: str, port: int) -> str | None:
        raise RuntimeError("a fault in the dial check")

    monkeypatch.setattr(Checkpoint, "dial_target", staticmethod(fails))
    tls = _inspected(gate, upstream.port)
    reply = _exchange(
        tls, f"GET /x HTTP/1.1\r\nHost: allowed.test:{upstream.port}\r\n\r\n".encode()
    )
    assert not reply.startswith(b"HTTP/1.1 200")
    assert upstream.accepted == 0
