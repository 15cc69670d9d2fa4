"""Threat classes 5, 11 and 16 inside an inspected tunnel: fronting by Host and ``:authority``, writes
through an allowed service, and request-rule evasion (in the request line itself, and by a protocol
switch nobody judged).

The gate terminates TLS for ``allowed.test`` (its rules read requests) with its own CA, and verifies the
upstream against the test CA. Every refusal is proven at the counting upstream: zero connections, or,
where earlier requests on the same tunnel were allowed, no new request. Allowed requests are proven to
arrive intact, on a reused upstream connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.core.requests import HttpHead
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import (
    WAIT,
    LocalCA,
    LoopbackServer,
    RunningGate,
    Upstream,
    curl,
    recv_head,
    serving,
    wait_until,
)
from tests.security import exchange, fresh_decisions, inspected_h2, inspecting, start_gate_with

pytestmark = pytest.mark.timeout(90)

JSON, LFS_JSON = "application/json", "application/vnd.git-lfs+json"  # as git-lfs and gh send them

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: git-discovery
    hosts: [allowed.test]
    ports: [{port}]
    methods: [GET]
    paths: ["/*/*/info/refs"]
    paths_case: insensitive
    query: {{service: git-upload-pack}}
  - name: git-fetch
    hosts: [allowed.test]
    ports: [{port}]
    methods: [POST]
    paths: ["/*/*/git-upload-pack"]
  - name: lfs-download
    hosts: [allowed.test]
    ports: [{port}]
    methods: [POST]
    paths: ["/*/*/info/lfs/objects/batch"]
    json_body: {{operation: download}}
  - name: graphql-read
    hosts: [allowed.test]
    ports: [{port}]
    methods: [POST]
    paths: [/graphql]
    graphql_operations: [query]
  - name: myorg-pages
    hosts: [allowed.test]
    ports: [{port}, {switch_port}, {ws_port}, {alpn_port}]
    methods: [GET, HEAD]
    paths: ["/myorg/**", "/redirect"]
  - name: socket
    hosts: [allowed.test]
    ports: [{port}, {ws_port}]
    methods: [GET]
    paths: [/socket]
    websocket: true
  - name: any-read
    hosts: [sub.allowed.test]
    ports: [{port}]
    methods: [GET, HEAD]
  - name: small-puts
    hosts: [sub.allowed.test]
    ports: [{port}]
    methods: [PUT]
    paths: [/open/small]
    max_request_bytes: 10
  - name: open-pages
    hosts: [sub.allowed.test]
    ports: [{port}]
    paths: ["/open/**"]
  - name: preflight
    hosts: [sub.allowed.test]
    ports: [{port}]
    methods: [OPTIONS]
  - name: plain
    hosts: [plain.test]
    ports: [{plain_port}]
  - name: other
    hosts: [other.test]
    ports: [{port}]
  - name: untrusted
    hosts: [untrusted.test]
    ports: [{bad_port}]
    methods: [GET]
  - name: redirector
    hosts: [other.test]
    ports: [{redirect_port}]
    methods: [GET]
"""


class RedirectUpstream(LoopbackServer):
    """A TLS upstream that answers every request with a 302 to ``location``, counting requests."""

    def __init__(self, tls: ssl.SSLContext, location: str) -> None:
        self.tls = tls
        self.location = location
        self.requests = 0
        super().__init__(threaded=True, name="redirect-upstream")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
            while recv_head(tls_conn):
                with self._lock:
                    self.requests += 1
                tls_conn.sendall(
                    f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )


@pytest.fixture(scope="module")
def names() -> list[str]:
    return [
        "allowed.test",
        "other.test",
        "evil.test",
        "untrusted.test",
        "plain.test",
        "sub.allowed.test",
    ]


@pytest.fixture(scope="module")
def dns(names: list[str]) -> Iterator[FakeDns]:
    yield from loopback_dns(*names)


@pytest.fixture(scope="module")
def upstream(test_ca: LocalCA) -> Iterator[Upstream]:
    yield from serving(Upstream("inspected", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """An upstream whose certificate comes from a CA nobody trusts."""
    rogue = LocalCA(tmp_path_factory.mktemp("rogue"), ["untrusted.test"])
    yield from serving(Upstream("untrusted", tls=rogue.server_context()))


@pytest.fixture(scope="module")
def canary(test_ca: LocalCA) -> Iterator[Upstream]:
    """evil.test's upstream: a redirect points here, and nothing may ever arrive."""
    yield from serving(Upstream("evil-canary", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def redirect(test_ca: LocalCA, canary: Upstream) -> Iterator[RedirectUpstream]:
    yield from serving(
        RedirectUpstream(test_ca.server_context(), f"https://evil.test:{canary.port}/loot")
    )


class SwitchingUpstream(LoopbackServer):
    """An upstream that answers a plain request with ``101 Switching Protocols`` nobody asked for,
    then counts every byte that still reaches it: a raw relay from there would carry the client's
    next requests past the request rules, unread."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls = tls
        self.requests = 0
        self.after = 0  # bytes received after the 101
        super().__init__(threaded=True, name="switching")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
            if not recv_head(tls_conn):
                return
            with self._lock:
                self.requests += 1
            tls_conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                while data := tls_conn.recv(65536):
                    with self._lock:
                        self.after += len(data)


@pytest.fixture(scope="module")
def switching(test_ca: LocalCA) -> Iterator[SwitchingUpstream]:
    yield from serving(SwitchingUpstream(test_ca.server_context()))


class WebSocketUpstream(LoopbackServer):
    """Answers the first request on each connection with ``101 Switching Protocols`` and
    ``Upgrade: websocket``, asked for or not, then counts every byte that still reaches it: frames
    relayed from there were judged by no request rule unless the gate allowed the upgrade."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls = tls
        self.heads: list[bytes] = []
        self.after = 0  # bytes received after a 101
        super().__init__(threaded=True, name="websocket")

    def reset(self) -> None:
        with self._lock:
            self.heads.clear()
            self.after = 0

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
            head = recv_head(tls_conn)
            if not head:
                return
            with self._lock:
                self.heads.append(head)
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(
                hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            tls_conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                while data := tls_conn.recv(65536):
                    with self._lock:
                        self.after += len(data)


@pytest.fixture(scope="module")
def ws(test_ca: LocalCA) -> Iterator[WebSocketUpstream]:
    yield from serving(WebSocketUpstream(test_ca.server_context()))


class AlpnUpstream(LoopbackServer):
    """An upstream that serves another protocol besides HTTP on its port, chosen by ALPN, and
    prefers it (as a server routing by ALPN may): it records the protocol each connection
    negotiated, and answers each request head with a 200."""

    PREFERRED = ("imap", "xmpp-client", "http/1.1")  # HTTP/1.1 only, as a server may

    def __init__(self, ca: LocalCA) -> None:
        self.context = ca.server_context()
        self.context.set_alpn_protocols(list(self.PREFERRED))
        self.negotiated: list[str | None] = []
        super().__init__(threaded=True, name="alpn-upstream")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with self.context.wrap_socket(conn, server_side=True) as tls_conn:
            with self._lock:
                self.negotiated.append(tls_conn.selected_alpn_protocol())
            while recv_head(tls_conn):
                tls_conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture(scope="module")
def alpn_upstream(test_ca: LocalCA) -> Iterator[AlpnUpstream]:
    yield from serving(AlpnUpstream(test_ca))


@pytest.fixture(scope="module")
def plain() -> Iterator[Upstream]:
    """plain.test's upstream: plain HTTP, allowed whole (no request rules)."""
    yield from serving(Upstream("plain"))


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    upstream: Upstream,
    untrusted: Upstream,
    redirect: RedirectUpstream,
    switching: SwitchingUpstream,
    ws: WebSocketUpstream,
    plain: Upstream,
    alpn_upstream: AlpnUpstream,
    test_ca: LocalCA,
) -> Iterator[RunningGate]:
    directory = tmp_path_factory.mktemp("inspection")
    running = start_gate_with(
        directory,
        POLICY.format(
            port=upstream.port,
            bad_port=untrusted.port,
            redirect_port=redirect.port,
            switch_port=switching.port,
            ws_port=ws.port,
            plain_port=plain.port,
            alpn_port=alpn_upstream.port,
        ),
        dns.nameserver,
        config=inspecting(directory, test_ca),
    )
    yield running
    running.stop()


@pytest.fixture
def gate_ca(gate: RunningGate) -> Path:
    return gate.ca


@pytest.fixture(autouse=True)
def _reset(upstream: Upstream, untrusted: Upstream, ws: WebSocketUpstream, plain: Upstream) -> None:
    upstream.reset()
    untrusted.reset()
    ws.reset()
    plain.reset()


class Tunnel:
    """A CONNECT tunnel through the gate with TLS to the gate's certificate, speaking raw HTTP/1.1."""

    def __init__(self, gate: RunningGate, ca: Path, host: str, port: int) -> None:
        raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = recv_head(raw)
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["http/1.1"])
        self.sock = context.wrap_socket(raw, server_hostname=host)
        self.authority = f"{host}:{port}"
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        fields = {"Host": self.authority, **(headers or {})}
        if body and "Transfer-Encoding" not in fields:
            fields["Content-Length"] = str(len(body))
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in fields.items()
        )
        self.send(head.encode() + b"\r\n" + body)
        return self.response()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {self.buffer!r}")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if status == 100:
            return self.response()
        return status, headers, body

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def tunnel(gate: RunningGate, gate_ca: Path, upstream: Upstream) -> Iterator[Tunnel]:
    opened = Tunnel(gate, gate_ca, "allowed.test", upstream.port)
    yield opened
    opened.close()


def last_request_decision(gate: RunningGate) -> object:
    decisions = [d for d in gate.decisions if d.kind == Kind.REQUEST]
    assert decisions, "no request decision"
    return decisions[-1]


# -- allowed requests pass intact, on one upstream connection ---------------------------------------


def test_read_requests_reach_the_upstream_over_one_kept_alive_connection(
    gate: RunningGate, tunnel: Tunnel, upstream: Upstream
) -> None:
    targets = [f"/myorg/repo/file{i}" for i in range(8)]  # more than mitmproxy's 5 per address
    targets.append("/org/repo.git/info/refs?service=git-upload-pack")
    for target in targets:
        status, _, body = tunnel.request("GET", target)
        assert status == 200, body
        assert b"host=allowed.test:" in body
    status, _, _ = tunnel.request("POST", "/org/repo.git/git-upload-pack", b"0032want x\n0000")
    assert status == 200
    assert upstream.accepted == 1
    assert [(m, t) for m, t, _ in upstream.requests][-1] == (
        "POST",
        "/org/repo.git/git-upload-pack",
    )
    assert len(upstream.requests) == len(targets) + 1
    decision = last_request_decision(gate)
    assert (decision.decision, decision.rule) == (Verdict.ALLOW, "git-fetch")  # type: ignore[attr-defined]


# -- class 11: writes through an allowed service ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "body", "headers", "reason"),
    [
        (
            "GET",
            "/org/repo.git/info/refs?service=git-receive-pack",
            b"",
            {},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        ("POST", "/org/repo.git/git-receive-pack", b"0000" * 10, {}, Reason.REQUEST_NOT_ALLOWED),
        (
            "POST",
            "/org/repo.git/git-receive-pack",
            b"5\r\nhello\r\n0\r\n\r\n",
            {"Transfer-Encoding": "chunked"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            "POST",
            "/org/repo.git/git-receive-pack",
            b"x" * 1000,
            {"Expect": "100-continue"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            "POST",
            "/org/repo.git/info/lfs/objects/batch",
            json.dumps({"operation": "upload", "objects": [{"oid": "a", "size": 1}]}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            "POST",
            "/org/repo.git/info/lfs/objects/batch",
            b'{"operation": "download", "operation": "upload"}',
            {},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            "POST",
            "/graphql",
            json.dumps({"query": "mutation { createGist(input: {}) { id } }"}).encode(),
            {"Content-Type": "application/json"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            # Go's encoding/json (Gitea, lfs-test-server, gqlgen) matches keys case-insensitively
            # and the last one wins
            "POST",
            "/org/repo.git/info/lfs/objects/batch",
            b'{"operation": "download", "objects": [], "Operation": "upload"}',
            {"Content-Type": "application/vnd.git-lfs+json"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            # ... and folds U+0130 (capital I with dot above) to "I" as well (Go >= 1.21)
            "POST",
            "/org/repo.git/info/lfs/objects/batch",
            '{"operation": "download", "objects": [], "operat\u0130on": "upload"}'.encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            "POST",
            "/graphql",
            b'{"query": "{ viewer { login } }", "QUERY": "mutation { createGist { id } }"}',
            {"Content-Type": "application/json"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            # express-graphql and its kin run the URL's query before the body's
            "POST",
            "/graphql?query=mutation%20%7B%20createGist(input%3A%20%7B%7D)%20%7B%20id%20%7D%20%7D",
            json.dumps({"query": "{ viewer { login } }"}).encode(),
            {"Content-Type": "application/json"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        ("PUT", "/myorg/repo/contents/x", b"data", {}, Reason.REQUEST_NOT_ALLOWED),
        ("DELETE", "/myorg/repo", b"", {}, Reason.REQUEST_NOT_ALLOWED),
        ("POST", "/gists", b"{}", {}, Reason.REQUEST_NOT_ALLOWED),
        ("POST", "/myorg/upload", b"x" * (3 * 1024 * 1024), {}, Reason.REQUEST_NOT_ALLOWED),
    ],
    ids=[
        "push-discovery",
        "push-pack",
        "push-pack-chunked",
        "push-expect-100",
        "lfs-upload",
        "lfs-duplicate-key",
        "graphql-mutation",
        "lfs-upload-in-another-case",
        "lfs-upload-in-a-go-folded-case",
        "graphql-mutation-in-another-case",
        "graphql-mutation-in-the-url",
        "rest-put",
        "rest-delete",
        "gist",
        "large-upload",
    ],
)
def test_writes_are_refused_before_anything_reaches_the_upstream(
    gate: RunningGate,
    gate_ca: Path,
    upstream: Upstream,
    method: str,
    target: str,
    body: bytes,
    headers: dict[str, str],
    reason: Reason,
) -> None:
    tunnel = Tunnel(gate, gate_ca, "allowed.test", upstream.port)
    try:
        status, reply_headers, text = tunnel.request(method, target, body, headers)
    finally:
        tunnel.close()
    assert status == 403, text
    assert reply_headers["x-egress-reason"] == str(reason)
    assert b"agent-egress refused this request" in text
    assert upstream.accepted == 0 and upstream.requests == []
    decision = last_request_decision(gate)
    assert decision.reason is reason and decision.decision is Verdict.DENY  # type: ignore[attr-defined]


def test_held_bodies_are_decided_before_the_upstream_is_dialled(
    gate: RunningGate, tunnel: Tunnel, upstream: Upstream
) -> None:
    """Lazy connections: a download batch and a GraphQL query are held, judged, then sent."""
    status, _, _ = tunnel.request(
        "POST",
        "/org/repo.git/info/lfs/objects/batch",
        b'{"operation": "download", "objects": []}',
        {"Content-Type": LFS_JSON},
    )
    assert status == 200
    status, _, _ = tunnel.request(
        "POST", "/graphql", b'{"query": "{ viewer { login } }"}', {"Content-Type": JSON}
    )
    assert status == 200
    assert [t for _, t, _ in upstream.requests] == [
        "/org/repo.git/info/lfs/objects/batch",
        "/graphql",
    ]
    assert upstream.accepted == 1


def test_a_refusal_keeps_the_tunnel_usable_for_allowed_requests(
    tunnel: Tunnel, upstream: Upstream
) -> None:
    assert tunnel.request("POST", "/org/r.git/git-receive-pack", b"0000")[0] == 403
    assert tunnel.request("GET", "/myorg/r")[0] == 200
    assert [t for _, t, _ in upstream.requests] == ["/myorg/r"]


# -- class 16: evasion ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers", "reason"),
    [
        ("/myorg/../evil/repo", {}, Reason.AMBIGUOUS_REQUEST),
        ("/myorg/%2e%2e/evil/repo", {}, Reason.AMBIGUOUS_REQUEST),
        ("/myorg%2f..%2fevil/repo", {}, Reason.AMBIGUOUS_REQUEST),
        ("/myorg/..%5cevil", {}, Reason.AMBIGUOUS_REQUEST),
        ("/myorg//evil", {}, Reason.AMBIGUOUS_REQUEST),
        ("/myorg;x=/../evil", {}, Reason.AMBIGUOUS_REQUEST),
        ("/myorg/%00", {}, Reason.AMBIGUOUS_REQUEST),
        ("/myorg/%zz", {}, Reason.AMBIGUOUS_REQUEST),
        ("/evil/repo", {}, Reason.REQUEST_NOT_ALLOWED),
        ("/myorg/repo", {"X-HTTP-Method-Override": "DELETE"}, Reason.REQUEST_NOT_ALLOWED),
        ("/myorg/repo", {"X-Method-Override": "PUT"}, Reason.REQUEST_NOT_ALLOWED),
        ("/myorg/repo", {"X-HTTP-Method": "PATCH"}, Reason.REQUEST_NOT_ALLOWED),
        ("/myorg/repo?_method=DELETE", {}, Reason.REQUEST_NOT_ALLOWED),
        ("/myorg/repo?.method=DELETE", {}, Reason.REQUEST_NOT_ALLOWED),
        ("/myorg/repo?+_method=DELETE", {}, Reason.REQUEST_NOT_ALLOWED),
        ("/myorg/repo?%20_method=PUT", {}, Reason.REQUEST_NOT_ALLOWED),
        (
            "/org/repo/info/refs?service=git-upload-pack&service=git-receive-pack",
            {},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        (
            "/org/repo/info/refs?service=git-upload-pack&+service=git-receive-pack",
            {},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        ("/myorg/repo", {"Host": "evil.test"}, Reason.HOST_MISMATCH),
        ("/myorg/repo", {"Host": "other.test:{port}"}, Reason.HOST_MISMATCH),
        ("https://evil.test/myorg/repo", {}, Reason.HOST_MISMATCH),
        (
            "/myorg/repo",
            {"Upgrade": "websocket", "Connection": "Upgrade"},
            Reason.REQUEST_NOT_ALLOWED,
        ),
        ("/myorg/repo", {"Upgrade": "h2c", "Connection": "Upgrade"}, Reason.AMBIGUOUS_REQUEST),
    ],
)
def test_evasions_are_refused_without_reaching_the_upstream(
    gate: RunningGate,
    gate_ca: Path,
    upstream: Upstream,
    target: str,
    headers: dict[str, str],
    reason: Reason,
) -> None:
    tunnel = Tunnel(gate, gate_ca, "allowed.test", upstream.port)
    fields = {k: v.format(port=upstream.port) for k, v in headers.items()}
    try:
        if "Host" in fields:
            tunnel.authority = fields.pop("Host")
        status, reply, _ = tunnel.request("GET", target, headers=fields)
    finally:
        tunnel.close()
    assert (status, reply.get("x-egress-reason")) == (403, str(reason))
    assert upstream.accepted == 0


def test_two_host_headers_are_refused(
    gate: RunningGate, tunnel: Tunnel, upstream: Upstream
) -> None:
    tunnel.send(
        f"GET /myorg/r HTTP/1.1\r\nHost: {tunnel.authority}\r\nHost: evil.test\r\n\r\n".encode()
    )
    status, reply, _ = tunnel.response()
    assert (status, reply.get("x-egress-reason")) == (403, "host-mismatch")
    assert upstream.accepted == 0


def test_a_websocket_upgrade_passes_only_where_a_rule_allows_it(
    tunnel: Tunnel, upstream: Upstream
) -> None:
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    status, _, _ = tunnel.request("GET", "/socket", headers=upgrade)
    assert status == 200  # this upstream does not speak WebSocket; the upgrade request reached it
    assert [(t, h.get("upgrade")) for _, t, h in upstream.requests] == [("/socket", "websocket")]


def test_an_unasked_protocol_switch_never_opens_a_raw_relay(
    gate: RunningGate, gate_ca: Path, switching: SwitchingUpstream
) -> None:
    """An upstream's 101 to a request that asked for no upgrade: mitmproxy would relay raw TCP
    from there (its ``rawtcp`` option), so a refused write sent next would reach the upstream
    unread. The gate turns that option off: the client's connection is closed instead."""
    before = switching.requests
    opened = Tunnel(gate, gate_ca, "allowed.test", switching.port)
    try:
        host = f"allowed.test:{switching.port}"
        opened.send(f"GET /myorg/page HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert wait_until(lambda: switching.requests == before + 1)
        with contextlib.suppress(OSError):
            opened.send(f"DELETE /myorg/repo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

        def ended() -> bool:  # the client's side closed, or the write reached the upstream
            if switching.after:
                return True
            try:
                return opened.sock.recv(65536) == b"" or bool(switching.after)
            except TimeoutError:
                return False
            except OSError:
                return True

        opened.sock.settimeout(0.2)
        assert wait_until(ended)
    finally:
        opened.close()
    assert switching.after == 0  # nothing after the 101 reached the upstream


def test_curl_http2_second_stream_naming_another_authority_gets_421(
    gate: RunningGate, gate_ca: Path, upstream: Upstream
) -> None:
    """curl sends a Host header as HTTP/2 ``:authority``; ``--next`` reuses the connection."""
    base = f"https://allowed.test:{upstream.port}"
    result = curl(
        f"{base}/myorg/second",
        gate.url,
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version} %{num_connects}\\n",
        f"{base}/myorg/first",
        "--next",
        "--proxy",
        gate.url,
        "--cacert",
        str(gate_ca),
        "--http2",
        "-H",
        f"Host: evil.test:{upstream.port}",
        "-w",
        "%{http_code} %{http_version} %{num_connects}\\n",
        cacert=gate_ca,
    )
    codes = [line.split() for line in result.body.splitlines() if line.strip()[:3].isdigit()]
    assert codes[0][:2] == ["200", "2"], result
    assert codes[-1] == ["421", "2", "0"], result  # second stream, same connection
    assert [t for _, t, _ in upstream.requests] == ["/myorg/first"]
    refused = last_request_decision(gate)
    assert refused.reason is Reason.HOST_MISMATCH  # type: ignore[attr-defined]


def test_curl_http1_forged_host_is_refused(
    gate: RunningGate, gate_ca: Path, upstream: Upstream
) -> None:
    result = curl(
        f"https://allowed.test:{upstream.port}/myorg/x",
        gate.url,
        "--http1.1",
        "-H",
        f"Host: other.test:{upstream.port}",
        cacert=gate_ca,
    )
    assert (result.status, result.headers["x-egress-reason"]) == (403, "host-mismatch")
    assert upstream.accepted == 0


def test_a_redirect_to_a_refused_host_is_not_followed(
    gate: RunningGate, gate_ca: Path, redirect: RedirectUpstream, canary: Upstream
) -> None:
    before = redirect.requests
    result = curl(f"https://other.test:{redirect.port}/x", gate.url, "-L", cacert=gate_ca)
    assert redirect.requests == before + 1
    assert result.returncode != 0 and "403" in result.stderr  # curl's CONNECT to evil.test
    assert canary.accepted == 0
    connects = [(d.host, d.decision) for d in gate.decisions if d.kind == Kind.CONNECT]
    assert connects[-1] == ("evil.test", Verdict.DENY)


def test_an_upstream_that_fails_verification_is_refused_not_passed_through(
    gate: RunningGate, gate_ca: Path, untrusted: Upstream
) -> None:
    tunnel = Tunnel(gate, gate_ca, "untrusted.test", untrusted.port)
    try:
        status, _, body = tunnel.request("GET", "/x")
        assert status == 502, body
        with contextlib.suppress(OSError, ConnectionError):
            tunnel.request("GET", "/y")  # nothing more is dialled for this tunnel
    finally:
        tunnel.close()
    assert untrusted.requests == []  # the TLS handshake failed: no request reached it
    assert untrusted.accepted == 1
    refused = [d for d in gate.decisions if d.reason is Reason.UPSTREAM_TLS_FAILED]
    assert refused and refused[-1].host == "untrusted.test"
    assert "verify" in (refused[-1].detail or "").lower()


@pytest.mark.parametrize(
    ("offered", "negotiated"),
    [
        (["http/1.1", "imap", "xmpp-client"], "http/1.1"),
        (["imap", "xmpp-client"], "http/1.1"),  # no HTTP offered: the gate speaks HTTP/1.1
        (["h2", "imap"], None),  # h2 offered, not served: HTTP/1.1 without ALPN
    ],
)
def test_an_inspected_upstream_is_offered_only_the_http_the_gate_judges(
    gate: RunningGate,
    gate_ca: Path,
    alpn_upstream: AlpnUpstream,
    offered: list[str],
    negotiated: str | None,
) -> None:
    """The client's other ALPN offers are not passed on: an upstream that serves another protocol
    on the port would pick it and read the requests the gate judged as HTTP as its commands."""
    before = len(alpn_upstream.negotiated)
    raw = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    authority = f"allowed.test:{alpn_upstream.port}"
    raw.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    assert recv_head(raw).startswith(b"HTTP/1.1 200")
    context = ssl.create_default_context(cafile=str(gate_ca))
    context.set_alpn_protocols(offered)
    with context.wrap_socket(raw, server_hostname="allowed.test") as sock:
        if sock.selected_alpn_protocol() == "h2":
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(
                1,
                [
                    (":method", "GET"),
                    (":path", "/myorg/x"),
                    (":scheme", "https"),
                    (":authority", authority),
                ],
                end_stream=True,
            )
            sock.sendall(conn.data_to_send())
            status = b""
            while not status and (data := sock.recv(65536)):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                sock.sendall(conn.data_to_send())
            assert status == b"200"
        else:
            sock.sendall(f"GET /myorg/x HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            assert recv_head(sock).startswith(b"HTTP/1.1 200")
    assert alpn_upstream.negotiated[before:] == [negotiated]


def test_an_inspected_tunnel_records_the_body_bytes_it_carried(
    gate: RunningGate, gate_ca: Path, upstream: Upstream
) -> None:
    """The connection-closed event counts what went upstream and came back: every allowed
    request body (declared or not), never a refused one's (read and dropped)."""
    tunnel = Tunnel(gate, gate_ca, "sub.allowed.test", upstream.port)
    client = "{}:{}".format(*tunnel.sock.getsockname()[:2])
    sent = received = 0
    try:
        for body in (b"x" * 300_000, b"y" * 1000):  # streamed, then held whole
            status, _, answer = tunnel.request("POST", "/open/upload", body)
            assert status == 200
            sent, received = sent + len(body), received + len(answer)
        status, _, _ = tunnel.request("POST", "/closed", b"z" * 5000)
        assert status == 403
    finally:
        tunnel.close()
    multiplexed = inspected_h2(gate, "sub.allowed.test", upstream.port)
    h2_client = "{}:{}".format(*multiplexed.getsockname()[:2])
    with multiplexed:
        conn = _h2_client(multiplexed)
        body = b"w" * 70_000  # no content-length: the gate frames it for the HTTP/1 upstream
        conn.send_headers(
            1,
            [
                (":method", "POST"),
                (":path", "/open/h2"),
                (":scheme", "https"),
                (":authority", f"sub.allowed.test:{upstream.port}"),
            ],
        )
        h2_status, h2_answer = _h2_post(multiplexed, conn, 1, body)
        assert h2_status == b"200"

    def closed(peer: str) -> dict[str, object] | None:
        found = [
            a for name, a in gate.memory.events if name.endswith("closed") and a["client"] == peer
        ]
        return found[-1] if found else None

    assert wait_until(lambda: closed(client) is not None and closed(h2_client) is not None)
    assert (closed(client) or {})["bytes_out"] == sent
    assert (closed(client) or {})["bytes_in"] == received
    assert (closed(h2_client) or {})["bytes_out"] == len(body)
    assert (closed(h2_client) or {})["bytes_in"] == len(h2_answer)


def _h2_client(sock: ssl.SSLSocket) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    conn.increment_flow_control_window(1 << 20)
    sock.sendall(conn.data_to_send())
    return conn


def _h2_post(
    sock: ssl.SSLSocket, conn: h2.connection.H2Connection, stream: int, body: bytes
) -> tuple[bytes, bytes]:
    """Send ``body`` on ``stream`` as the peer's window allows; the response's status and body."""
    status, answer, left, ended = b"", b"", body, False
    while not ended:
        while left and conn.local_flow_control_window(stream) > 0:
            size = min(len(left), conn.local_flow_control_window(stream), 16384)
            conn.send_data(stream, left[:size], end_stream=size == len(left))
            left = left[size:]
        sock.sendall(conn.data_to_send())
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers)[b":status"]
            elif isinstance(event, h2.events.DataReceived):
                answer += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
    sock.sendall(conn.data_to_send())
    return status, answer


def test_passthrough_hosts_are_not_inspected(
    gate: RunningGate, test_ca: LocalCA, upstream: Upstream
) -> None:
    """other.test's rule has no request conditions: its TLS is relayed, the upstream's own
    certificate reaches the client (trusted through the test CA, not the gate's)."""
    result = curl(f"https://other.test:{upstream.port}/anything", gate.url, cacert=test_ca.ca_path)
    assert result.status == 200 and "host=other.test" in result.body
    assert not any(
        d.kind == Kind.REQUEST and (d.host, d.port) == ("other.test", upstream.port)
        for d in gate.decisions
    )


def test_many_concurrent_tunnels_stay_correct(
    gate: RunningGate, gate_ca: Path, upstream: Upstream
) -> None:
    errors: list[str] = []

    def client(n: int) -> None:
        try:
            t = Tunnel(gate, gate_ca, "allowed.test", upstream.port)
            try:
                for i in range(3):
                    if t.request("GET", f"/myorg/{n}/{i}")[0] != 200:
                        errors.append(f"{n}/{i} allowed request refused")
                    if t.request("DELETE", f"/myorg/{n}/{i}")[0] != 403:
                        errors.append(f"{n}/{i} delete not refused")
            finally:
                t.close()
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 3)
    assert errors == []
    assert all(m == "GET" for m, _, _ in upstream.requests)
    assert len(upstream.requests) == 24


def test_decisions_record_query_names_not_values(gate: RunningGate, tunnel: Tunnel) -> None:
    """URLs carry tokens: by default a decision keeps the path and the query's names only."""
    status, _, _ = tunnel.request("GET", "/myorg/r?token=s3cr3t&page=2")
    assert status == 200
    allowed = last_request_decision(gate)
    assert (allowed.path, allowed.query) == ("/myorg/r", "token=&page=")  # type: ignore[attr-defined]
    status, _, body = tunnel.request("DELETE", "/myorg/r?token=s3cr3t")
    assert status == 403 and b"s3cr3t" not in body
    refused = last_request_decision(gate)
    assert "s3cr3t" not in str(refused.to_dict())  # type: ignore[attr-defined]


def test_query_values_are_kept_only_when_configured() -> None:
    from addons.gate import _shown_query

    assert _shown_query("service=git-upload-pack&flag", False) == "service=&flag"
    assert _shown_query("service=git-upload-pack&flag", True) == "service=git-upload-pack&flag"


def chunked(body: bytes, size: int = 65536) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_held_body_of_unknown_length_is_bounded_and_never_sent(
    gate: RunningGate, gate_ca: Path, upstream: Upstream
) -> None:
    """An LFS batch must be read to be decided. Sent chunked and longer than the gate holds, it is
    refused as too large; nothing reaches the upstream, not even its head."""
    from proxy.core.requests import HOLD_LIMIT

    tunnel = Tunnel(gate, gate_ca, "allowed.test", upstream.port)
    padding = b" " * (HOLD_LIMIT + 100_000)
    body = b'{"operation": "download", "objects": []' + padding + b"}"
    try:
        status, reply, _ = tunnel.request(
            "POST",
            "/org/repo.git/info/lfs/objects/batch",
            chunked(body),
            {"Transfer-Encoding": "chunked", "Content-Type": LFS_JSON},
        )
    finally:
        tunnel.close()
    assert (status, reply.get("x-egress-reason")) == (403, "request-too-large")
    assert upstream.accepted == 0


def test_a_held_body_that_overflowed_is_refused_though_another_rule_allows_it(
    gate: RunningGate, gate_ca: Path, upstream: Upstream
) -> None:
    """A size limit holds a chunked body; past the hold limit it is dropped while counted, so what
    is left is not what the client sent: refused as too large, though a rule without a limit would
    have allowed the request, and nothing of it reaches the upstream."""
    from proxy.core.requests import HOLD_LIMIT

    tunnel = Tunnel(gate, gate_ca, "sub.allowed.test", upstream.port)
    body = b"A" * HOLD_LIMIT + b"B" * 200_000
    try:
        status, reply, _ = tunnel.request(
            "PUT", "/open/small", chunked(body), {"Transfer-Encoding": "chunked"}
        )
    finally:
        tunnel.close()
    assert (status, reply.get("x-egress-reason")) == (403, "request-too-large")
    assert upstream.accepted == 0 and upstream.bytes_received == 0


def test_a_held_chunked_body_within_the_limit_is_decided_then_sent_whole(
    tunnel: Tunnel, upstream: Upstream
) -> None:
    body = b'{"operation": "download", "objects": []}'
    status, _, _ = tunnel.request(
        "POST",
        "/org/repo.git/info/lfs/objects/batch",
        chunked(body, 7),
        {"Transfer-Encoding": "chunked", "Content-Type": LFS_JSON},
    )
    assert status == 200
    posts = [h for h in upstream.heads if h.startswith(b"POST ")]  # the body is forwarded chunked
    assert [h.split(b" ")[1] for h in posts] == [b"/org/repo.git/info/lfs/objects/batch"]
    assert upstream.bytes_received >= len(body)
    upload = b'{"operation": "upload", "objects": []}'
    status, reply, _ = tunnel.request(
        "POST",
        "/org/repo.git/info/lfs/objects/batch",
        chunked(upload, 5),
        {"Transfer-Encoding": "chunked", "Content-Type": LFS_JSON},
    )
    assert (status, reply.get("x-egress-reason")) == (403, "request-not-allowed")
    assert len([h for h in upstream.heads if h.startswith(b"POST ")]) == 1


# -- class 5/16: the request line an HTTP/1 upstream is sent ----------------------------------------

READS = (
    "sub.allowed.test"  # its rules: any GET or HEAD (the presets' shape), any method on /open/**
)


def h2_statuses(
    gate: RunningGate, port: int, fields: list[tuple[str, str]]
) -> tuple[list[bytes], list[h2.events.Event]]:
    """One HTTP/2 stream on an inspected tunnel to READS, its fields sent as given (the client
    library's own checks off): the ``:status`` of each response, and every event."""
    sock = inspected_h2(gate, READS, port)
    config = h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    client = h2.connection.H2Connection(config)
    client.initiate_connection()
    client.send_headers(1, fields, end_stream=True)
    seen: list[h2.events.Event] = []
    try:
        sock.sendall(client.data_to_send())
        sock.settimeout(WAIT)
        for _ in range(64):
            data = sock.recv(65536)
            if not data:
                break
            seen += client.receive_data(data)
            sock.sendall(client.data_to_send())
            ended = h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated
            if any(isinstance(e, ended) for e in seen):
                break
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    finally:
        sock.close()
    statuses = [
        dict(e.headers).get(b":status", b"")
        for e in seen
        if isinstance(e, h2.events.ResponseReceived)
    ]
    return statuses, seen


def h2_fields(port: int, method: str, path: str) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":scheme", "https"),
        (":authority", f"{READS}:{port}"),
        (":path", path),
    ]


def refused_as_bad_request(gate: RunningGate, before: int) -> Decision:
    requests = [d for d in fresh_decisions(gate, before) if d.kind == Kind.REQUEST]
    assert [(d.decision, d.reason) for d in requests] == [(Verdict.DENY, Reason.BAD_REQUEST)]
    return requests[0]


def test_control_http2_origin_form_and_options_asterisk_reach_the_upstream(
    gate: RunningGate, upstream: Upstream
) -> None:
    assert h2_statuses(gate, upstream.port, h2_fields(upstream.port, "GET", "/myorg/x"))[0] == [
        b"200"
    ]
    assert h2_statuses(gate, upstream.port, h2_fields(upstream.port, "OPTIONS", "*"))[0] == [b"200"]
    assert [h.split(b"\r\n")[0] for h in upstream.heads] == [
        b"GET /myorg/x HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
    ]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "https://evil.test/x"),
        ("GET", "http://evil.test/x"),
        ("GET", "evil.test:443"),
        ("GET", "//evil.test/x"),
        ("GET", "open/x"),
        ("GET", "*"),
        ("GET /evil/secret", "/open/x"),
        ("GET", "/open/x /evil/secret"),
    ],
    ids=["https-absolute", "http-absolute", "authority", "network-path", "relative", "asterisk-get",
         "method-with-space", "path-with-space"],
)  # fmt: skip
def test_an_http2_request_line_an_http1_upstream_would_read_otherwise_is_refused(
    gate: RunningGate, upstream: Upstream, method: str, path: str
) -> None:
    """HTTP/2 carries ``:method`` and ``:path`` as field values; mitmproxy writes them verbatim
    into the HTTP/1 upstream's request line. An absolute-form path names another virtual host
    (RFC 9112 3.2.2: the server routes by it, ignoring Host); a method with a space moves the
    target (``GET /evil/secret /open/x``). A rule without paths (any GET), or without methods
    (any method on /open/**), allowed them. A space in the path (the request step refused it as
    ambiguous already) is the same mistake. Each is a bad request, decided before any rule, and
    nothing reaches the upstream."""
    before = len(gate.decisions)
    statuses, seen = h2_statuses(gate, upstream.port, h2_fields(upstream.port, method, path))
    assert upstream.heads == [] and upstream.accepted == 0
    assert statuses == [b"400"], seen
    refused_as_bad_request(gate, before)


@pytest.mark.parametrize(
    "line",
    ["GET //evil.test/x", "GET *", 'G"ET /open/x', "G{E}T /open/x", "GET\x01 /open/x"],
    ids=["network-path", "asterisk-get", "quote-in-method", "braces-in-method", "control"],
)
def test_an_http1_request_line_outside_the_grammar_is_refused(
    gate: RunningGate, gate_ca: Path, upstream: Upstream, line: str
) -> None:
    before = len(gate.decisions)
    tunnel = Tunnel(gate, gate_ca, READS, upstream.port)
    try:
        tunnel.send(f"{line} HTTP/1.1\r\nHost: {tunnel.authority}\r\n\r\n".encode("latin-1"))
        status, reply, _ = tunnel.response()
    finally:
        tunnel.close()
    assert (status, reply.get("x-egress-reason")) == (400, "bad-request")
    assert upstream.accepted == 0
    refused_as_bad_request(gate, before)


def test_control_options_asterisk_over_http1(
    gate: RunningGate, gate_ca: Path, upstream: Upstream
) -> None:
    tunnel = Tunnel(gate, gate_ca, READS, upstream.port)
    try:
        tunnel.send(f"OPTIONS * HTTP/1.1\r\nHost: {tunnel.authority}\r\n\r\n".encode())
        assert tunnel.response()[0] == 200
    finally:
        tunnel.close()
    assert [h.split(b"\r\n")[0] for h in upstream.heads] == [b"OPTIONS * HTTP/1.1"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/x", 200),
        ("DELETE", "/x?y", 200),
        ('G"ET', "/x", 400),
        ("GET", "//evil.test/x", 400),
    ],
    ids=["control-fast-path", "control-mitmproxy", "quote-in-method", "network-path"],
)
def test_plain_http_request_lines_are_held_to_the_same_grammar(
    gate: RunningGate, plain: Upstream, method: str, path: str, status: int
) -> None:
    """plain.test is allowed whole (no request rules): before, any method and target went up.
    Absolute-form is how a plain request names its host to a proxy: it keeps working, on the
    gate's own plain path (GET) and on mitmproxy's."""
    authority = f"plain.test:{plain.port}"
    reply = exchange(
        gate, f"{method} http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    )
    assert reply.status == status, reply.data
    if status == 200:
        assert [(m, t) for m, t, _ in plain.requests] == [(method, path)]
    else:
        assert reply.header("x-egress-reason") == "bad-request"
        assert plain.accepted == 0


# -- class 16: a protocol switch the gate did not judge --------------------------------------------


def ws_frame(payload: bytes) -> bytes:
    """A masked binary frame, as a client sends it (payload under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + mask + masked


HANDSHAKE = {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}


def switch_attempt(
    gate: RunningGate, ca: Path, ws: WebSocketUpstream, target: str, fields: dict[str, str]
) -> bytes:
    """Send one GET on a tunnel to the switching upstream, then a WebSocket frame; what the client
    got back (until the gate closed the connection, or the wait ended)."""
    opened = Tunnel(gate, ca, "allowed.test", ws.port)
    got = b""
    try:
        head = f"GET {target} HTTP/1.1\r\nHost: {opened.authority}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        opened.send(head.encode() + b"\r\n")
        opened.sock.settimeout(1.0)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in got:
                chunk = opened.sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        with contextlib.suppress(OSError):
            opened.send(ws_frame(b"exfiltrated: " + b"S" * 40))
        wait_until(lambda: ws.after > 0, timeout=1.0)
    finally:
        opened.close()
    return got


@pytest.mark.parametrize(
    "fields",
    [
        {"Sec-WebSocket-Version": "13"},
        HANDSHAKE,
        {"Sec-WebSocket-Key": HANDSHAKE["Sec-WebSocket-Key"]},
        {"Sec_WebSocket_Version": "13"},
    ],
    ids=["version", "key-and-version", "key", "underscore-spelling"],
)
def test_websocket_handshake_fields_without_upgrade_are_judged_as_an_upgrade(
    gate: RunningGate, gate_ca: Path, ws: WebSocketUpstream, fields: dict[str, str]
) -> None:
    """mitmproxy opens its WebSocket relay on the request's Sec-WebSocket-Version and the
    response's Upgrade, never looking at the request's Upgrade: such a request is an upgrade for
    the rules, and this host's rules allow WebSocket only at /socket."""
    before = len(gate.decisions)
    got = switch_attempt(gate, gate_ca, ws, "/myorg/page", fields)
    assert got.startswith(b"HTTP/1.1 403 "), got
    assert b"request-not-allowed" in got
    assert ws.heads == [] and ws.after == 0
    refused = [d for d in fresh_decisions(gate, before) if d.kind == Kind.REQUEST]
    assert [d.reason for d in refused] == [Reason.REQUEST_NOT_ALLOWED]
    assert "(WebSocket)" in (refused[0].detail or "")


@pytest.mark.parametrize("missed", [False, True], ids=["no-handshake", "handshake-missed"])
def test_an_unjudged_switch_to_websocket_is_never_passed_on(
    gate: RunningGate,
    gate_ca: Path,
    ws: WebSocketUpstream,
    monkeypatch: pytest.MonkeyPatch,
    missed: bool,
) -> None:
    """An upstream answers an allowed plain read with ``101`` and ``Upgrade: websocket``. The
    client must not see the switch, and nothing it sends next may reach the upstream.
    ``handshake-missed``: the request carries Sec-WebSocket-Version and the request step is made
    to miss it (judging by ``Upgrade`` alone, as before): mitmproxy would open its WebSocket relay,
    and only the switch check stands in the way."""
    fields: dict[str, str] = {}
    if missed:
        monkeypatch.setattr(
            HttpHead,
            "websocket",
            property(lambda head: (head.upgrade or "").strip().lower() == "websocket"),
        )
        fields = HANDSHAKE
    before = len(gate.decisions)
    target = f"/myorg/switch-{'missed' if missed else 'plain'}"
    got = switch_attempt(gate, gate_ca, ws, target, fields)
    assert len(ws.heads) == 1  # the read was allowed and sent
    assert b"101" not in got, got  # the switch never reached the client
    assert ws.after == 0  # nor did anything of the client's reach the upstream after it
    decisions = [d for d in fresh_decisions(gate, before) if d.kind == Kind.REQUEST]
    assert [(d.decision, d.reason) for d in decisions] == [
        (Verdict.ALLOW, Reason.ALLOWED_BY_RULE),
        (Verdict.DENY, Reason.UNSUPPORTED),
    ]
    assert "switched protocols" in (decisions[1].detail or "")


def test_control_an_allowed_websocket_upgrade_is_relayed(
    gate: RunningGate, gate_ca: Path, ws: WebSocketUpstream
) -> None:
    got = switch_attempt(
        gate, gate_ca, ws, "/socket", {"Upgrade": "websocket", "Connection": "Upgrade", **HANDSHAKE}
    )
    assert got.startswith(b"HTTP/1.1 101 "), got
    assert len(ws.heads) == 1 and b"upgrade: websocket" in ws.heads[0].lower()
    assert wait_until(lambda: ws.after > 0)  # the client's frame, relayed
    allowed = last_request_decision(gate)
    assert (allowed.decision, allowed.rule) == (Verdict.ALLOW, "socket")  # type: ignore[attr-defined]
