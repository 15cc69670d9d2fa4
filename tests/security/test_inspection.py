"""Threat classes 5, 11 and 16 inside an inspected tunnel: fronting by Host and ``:authority``, writes
through an allowed service, and request-rule evasion.

The gate terminates TLS for ``allowed.test`` (its rules read requests) with its own CA, and verifies the
upstream against the test CA. Every refusal is proven at the counting upstream: zero connections, or,
where earlier requests on the same tunnel were allowed, no new request. Allowed requests are proven to
arrive intact, on a reused upstream connection.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Kind, Reason, Verdict
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
from tests.security import inspecting, start_gate_with

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
    ports: [{port}, {switch_port}]
    methods: [GET, HEAD]
    paths: ["/myorg/**", "/redirect"]
  - name: socket
    hosts: [allowed.test]
    ports: [{port}]
    methods: [GET]
    paths: [/socket]
    websocket: true
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
    return ["allowed.test", "other.test", "evil.test", "untrusted.test"]


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


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    upstream: Upstream,
    untrusted: Upstream,
    redirect: RedirectUpstream,
    switching: SwitchingUpstream,
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
        ),
        dns.nameserver,
        config=inspecting(directory, test_ca),
    )
    yield running
    running.stop()


@pytest.fixture
def gate_ca(gate: RunningGate) -> Path:
    return Path(gate.config["confdir"]) / "mitmproxy-ca-cert.pem"


@pytest.fixture(autouse=True)
def _reset(upstream: Upstream, untrusted: Upstream) -> None:
    upstream.reset()
    untrusted.reset()


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
        (
            "/org/repo/info/refs?service=git-upload-pack&service=git-receive-pack",
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
