"""Plain-HTTP keep-alive requests served by the front end (addons/plainhttp.py), under attack.

The front end serves only heads it can serve exactly as mitmproxy would, decided per request from a
peek before anything is consumed; everything else goes to mitmproxy at that request boundary. Proven
here with counting upstreams: a refusal sends nothing upstream, each pipelined request is decided on
its own (another host is a decision and a connection of its own), smuggling heads are not taken (and
mitmproxy refuses them as before), an upstream response whose framing is ambiguous closes the client
connection before anything ambiguous reaches it, and the same requests through the front end and
through mitmproxy give the same decisions and the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.core.decision import Decision, Verdict
from tests.dnsfake import FakeDns
from tests.harness import WAIT, LoopbackServer, RunningGate, Upstream, recv_head, waited_for
from tests.security import exchange, fresh_decisions, start_gate_with
from tests.security.test_smuggling import ATTACKS, SMUGGLED

pytestmark = pytest.mark.timeout(120)

POLICY = """
version: 1
allow_internal: [127.0.0.0/8]
rules:
  - name: first
    hosts: [a.test]
    ports: [{a}]
  - name: second
    hosts: [b.test]
    ports: [{b}]
  - name: scripted
    hosts: [raw.test]
    ports: [{raw}]
"""


class Origin(Upstream):
    """A counting upstream that answers HEAD as HTTP says (the head only)."""

    def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes:
        full = super().answer(method, target, headers, body)
        return full.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n" if method == "HEAD" else full


class Scripted(LoopbackServer):
    """An upstream that answers the first request head on each connection with ``reply`` as is."""

    def __init__(self) -> None:
        self.reply = b""
        self.close_after = False  # close once the reply is sent (a body delimited by the close)
        super().__init__(threaded=True, name="upstream-scripted")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        if recv_head(conn):
            conn.sendall(self.reply)
            if self.close_after:
                return
            conn.settimeout(2.0)
            try:  # stay open until the gate closes (it must, where the reply was ambiguous)
                while conn.recv(4096):
                    pass
            except OSError:
                pass


@pytest.fixture(scope="module")
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.loopback("a.test", "b.test", "raw.test", "denied.test")
        yield server


@pytest.fixture(scope="module")
def origin_a() -> Iterator[Origin]:
    server = Origin("a")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def origin_b() -> Iterator[Origin]:
    server = Origin("b")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.stop()


def _gate(
    factory: pytest.TempPathFactory,
    dns: FakeDns,
    a: Origin,
    b: Origin,
    raw: Scripted,
    fast: bool,
) -> RunningGate:
    directory = factory.mktemp("fast" if fast else "mitm")
    policy = POLICY.format(a=a.port, b=b.port, raw=raw.port)
    return start_gate_with(directory, policy, dns.nameserver, config={"fast_plain_http": fast})


@pytest.fixture(scope="module")
def gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    origin_a: Origin,
    origin_b: Origin,
    scripted: Scripted,
) -> Iterator[RunningGate]:
    running = _gate(tmp_path_factory, dns, origin_a, origin_b, scripted, fast=True)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mitm_gate(
    tmp_path_factory: pytest.TempPathFactory,
    dns: FakeDns,
    origin_a: Origin,
    origin_b: Origin,
    scripted: Scripted,
) -> Iterator[RunningGate]:
    running = _gate(tmp_path_factory, dns, origin_a, origin_b, scripted, fast=False)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _reset(
    gate: RunningGate,
    mitm_gate: RunningGate,
    origin_a: Origin,
    origin_b: Origin,
    scripted: Scripted,
    dns: FakeDns,
) -> None:
    """Counters start from zero once the gates have let go of every connection of the test before:
    a client that gave up waiting (``exchange`` returns after a silence) leaves the gate serving its
    request, whose upstream connection would otherwise be counted against the next test."""
    waited_for(
        lambda: (
            gate.gate.checkpoint.connections.active == 0
            and mitm_gate.gate.checkpoint.connections.active == 0
        ),
        "the gates to finish the last test's connections",
    )
    origin_a.reset()
    origin_b.reset()
    scripted.accepted = 0
    scripted.close_after = False
    dns.reset_queries()


def get(host: str, port: int, path: str = "/", extra: bytes = b"", method: str = "GET") -> bytes:
    return (
        f"{method} http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        + extra
        + b"\r\n"
    )


def decided(gate: RunningGate) -> int:
    plain: Any = gate.gate.tunnels.plain
    return int(plain.decided)


# -- refusals send nothing --------------------------------------------------------------------


def test_a_refused_request_sends_nothing_upstream(gate: RunningGate, origin_a: Origin) -> None:
    before, fast = len(gate.decisions), decided(gate)
    # a.test is allowed on its own port only: the same host on another port is refused
    reply = exchange(gate, get("a.test", origin_a.port + 1 if origin_a.port < 65535 else 1))
    assert reply.status == 403 and not reply.closed
    assert decided(gate) == fast + 1, "not decided by the front end"
    assert origin_a.accepted == 0
    [decision] = fresh_decisions(gate, before)
    assert decision.decision is Verdict.DENY and decision.reason == "port-not-allowed"


def test_a_refusal_keeps_the_connection_and_the_next_request_is_decided_on_its_own(
    gate: RunningGate, origin_a: Origin, dns: FakeDns
) -> None:
    before, fast = len(gate.decisions), decided(gate)
    pipelined = get("denied.test", 80) + get("a.test", origin_a.port, "/ok")
    reply = exchange(gate, pipelined, responses=2)
    assert reply.statuses() == [403, 200]
    assert decided(gate) == fast + 2
    assert [(d.host, d.decision) for d in fresh_decisions(gate, before)] == [
        ("denied.test", Verdict.DENY),
        ("a.test", Verdict.ALLOW),
    ]
    assert [target for _, target, _ in origin_a.requests] == ["/ok"]
    assert not any(name == "denied.test." for name, _, _ in dns.queries), "a refusal resolved"


def test_a_pipelined_request_to_another_host_is_decided_and_dialled_on_its_own(
    gate: RunningGate, origin_a: Origin, origin_b: Origin
) -> None:
    before = len(gate.decisions)
    pipelined = get("a.test", origin_a.port, "/1") + get("b.test", origin_b.port, "/2")
    reply = exchange(gate, pipelined, responses=2)
    assert reply.statuses() == [200, 200]
    assert b"hello from a: GET /1" in reply.data and b"hello from b: GET /2" in reply.data
    assert [d.rule for d in fresh_decisions(gate, before)] == ["first", "second"]
    # each host saw only its own request, on its own connection
    assert [t for _, t, _ in origin_a.requests] == ["/1"] and origin_a.accepted == 1
    assert [t for _, t, _ in origin_b.requests] == ["/2"] and origin_b.accepted == 1


def test_switching_host_mid_connection_never_reuses_the_upstream(
    gate: RunningGate, origin_a: Origin, origin_b: Origin
) -> None:
    """a, b, a on one client connection: three decisions, and the upstream of one host never
    carries another host's request."""
    sequence = (
        get("a.test", origin_a.port, "/1")
        + get("b.test", origin_b.port, "/2")
        + get("a.test", origin_a.port, "/3")
    )
    reply = exchange(gate, sequence, responses=3)
    assert reply.statuses() == [200, 200, 200]
    assert [t for _, t, _ in origin_a.requests] == ["/1", "/3"]
    assert [t for _, t, _ in origin_b.requests] == ["/2"]
    assert origin_a.accepted == 2 and origin_b.accepted == 1


def test_one_upstream_connection_while_the_host_stays_the_same(
    gate: RunningGate, origin_a: Origin
) -> None:
    sequence = b"".join(get("a.test", origin_a.port, f"/{i}") for i in range(8))
    reply = exchange(gate, sequence, responses=8)
    assert reply.statuses() == [200] * 8
    assert origin_a.accepted == 1 and len(origin_a.requests) == 8


def test_a_host_header_naming_another_host_is_refused_before_anything_is_sent(
    gate: RunningGate, origin_a: Origin, origin_b: Origin
) -> None:
    before, fast = len(gate.decisions), decided(gate)
    fronted = f"GET http://a.test:{origin_a.port}/ HTTP/1.1\r\nHost: b.test:{origin_b.port}\r\n\r\n"
    reply = exchange(gate, fronted.encode())
    assert reply.status == 403 and decided(gate) == fast + 1
    assert origin_a.accepted == origin_b.accepted == 0
    assert [d.reason for d in fresh_decisions(gate, before)] == ["host-mismatch"]


def test_the_gates_own_headers_and_the_proxy_credential_never_reach_the_upstream(
    gate: RunningGate, origin_a: Origin
) -> None:
    extra = (
        b"X-Egress-Rule: forged\r\nX_Egress_Decision: allow\r\nProxy-Authorization: Basic eDp5\r\n"
    )
    reply = exchange(gate, get("a.test", origin_a.port, extra=extra))
    assert reply.status == 200
    [head] = origin_a.heads
    assert b"egress" not in head.lower() and b"proxy-authorization" not in head.lower()


# -- smuggling heads are not taken; mitmproxy refuses them as before ----------------------------


@pytest.mark.parametrize("name,extra,body", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_a_smuggling_head_after_a_served_request_goes_to_mitmproxy_and_is_refused(
    gate: RunningGate, origin_a: Origin, name: str, extra: bytes, body: bytes
) -> None:
    fast = decided(gate)
    first = get("a.test", origin_a.port, "/first")
    attack = get("a.test", origin_a.port, "/read", extra) + body
    reply = exchange(gate, first + attack, responses=2)
    assert decided(gate) == fast + 1, "the front end took a head it must not"
    assert reply.statuses()[:1] == [200]
    assert [t for _, t, _ in origin_a.requests if t == "/write"] == [], "smuggled upstream"
    assert SMUGGLED.split(b" ")[1].decode() not in [t for _, t, _ in origin_a.requests]


WEIRD_HEADS = [
    (
        "obs-fold",
        b"GET http://a.test:{p}/ HTTP/1.1\r\nHost: a.test:{p}\r\nX-A: 1\r\n folded\r\n\r\n",
    ),
    ("bare-lf", b"GET http://a.test:{p}/ HTTP/1.1\nHost: a.test:{p}\n\n"),
    ("bare-lf-in-field", b"GET http://a.test:{p}/ HTTP/1.1\r\nHost: a.test:{p}\nX: y\r\n\r\n"),
    (
        "two-hosts",
        b"GET http://a.test:{p}/ HTTP/1.1\r\nHost: a.test:{p}\r\nHost: a.test:{p}\r\n\r\n",
    ),
    ("http-1.0", b"GET http://a.test:{p}/ HTTP/1.0\r\nHost: a.test:{p}\r\n\r\n"),
    ("origin-form", b"GET / HTTP/1.1\r\nHost: a.test:{p}\r\n\r\n"),
    ("userinfo", b"GET http://x@a.test:{p}/ HTTP/1.1\r\nHost: a.test:{p}\r\n\r\n"),
    ("short-ip", b"GET http://127.1:{p}/ HTTP/1.1\r\nHost: 127.1:{p}\r\n\r\n"),
    ("upgrade", b"GET http://a.test:{p}/ HTTP/1.1\r\nHost: a.test:{p}\r\nUpgrade: h2c\r\n\r\n"),
    (
        "expect",
        b"GET http://a.test:{p}/ HTTP/1.1\r\nHost: a.test:{p}\r\nExpect: 100-continue\r\n\r\n",
    ),
    ("nul", b"GET http://a.test:{p}/ HTTP/1.1\r\nHost: a.test:{p}\r\nX: a\x00b\r\n\r\n"),
]


@pytest.mark.parametrize("name,head", WEIRD_HEADS, ids=[w[0] for w in WEIRD_HEADS])
def test_an_unusual_head_is_not_taken_by_the_front_end(
    gate: RunningGate, mitm_gate: RunningGate, origin_a: Origin, name: str, head: bytes
) -> None:
    """Whatever mitmproxy makes of it (a refusal, or serving it), the front end leaves it alone,
    and the client sees what it would see with mitmproxy alone."""
    raw = head.replace(b"{p}", str(origin_a.port).encode())
    fast = decided(gate)
    via_front = exchange(gate, raw)
    assert decided(gate) == fast, "the front end took a head it must not"
    via_mitm = exchange(mitm_gate, raw)
    assert via_front.statuses() == via_mitm.statuses()


def test_an_oversize_head_is_refused_and_sends_nothing(gate: RunningGate, origin_a: Origin) -> None:
    big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
    reply = exchange(gate, get("a.test", origin_a.port, extra=big))
    assert reply.status == 431
    assert origin_a.accepted == 0


def test_too_many_fields_in_a_small_head_are_refused_by_the_front_end_as_by_mitmproxy(
    gate: RunningGate, mitm_gate: RunningGate, origin_a: Origin
) -> None:
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(150))
    fast = decided(gate)
    before = len(gate.decisions), len(mitm_gate.decisions)
    via_front = exchange(gate, get("a.test", origin_a.port, extra=many))
    via_mitm = exchange(mitm_gate, get("a.test", origin_a.port, extra=many))
    assert decided(gate) == fast + 1
    assert via_front.status == via_mitm.status == 431
    assert origin_a.accepted == 0
    front = fresh_decisions(gate, before[0])
    mitm = fresh_decisions(mitm_gate, before[1])
    assert [d.reason for d in front] == [d.reason for d in mitm] == ["head-too-large"]


def test_a_request_mitmproxy_must_serve_is_handed_over_mid_connection(
    gate: RunningGate, origin_a: Origin
) -> None:
    """A request with a body after two served ones: served by mitmproxy on the same connection."""
    fast = decided(gate)
    post = (
        f"POST http://a.test:{origin_a.port}/p HTTP/1.1\r\nHost: a.test:{origin_a.port}\r\n"
        "Content-Length: 4\r\n\r\nbody"
    ).encode()
    sequence = get("a.test", origin_a.port, "/1") + get("a.test", origin_a.port, "/2") + post
    reply = exchange(gate, sequence, responses=3)
    assert reply.statuses() == [200, 200, 200]
    assert decided(gate) == fast + 2
    assert [t for _, t, _ in origin_a.requests] == ["/1", "/2", "/p"]


# -- responses whose framing is ambiguous close the connection --------------------------------

AMBIGUOUS = [
    (
        "length-and-chunked",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
    ),
    (
        "two-lengths",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    ),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc"),
    ("folded", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 3\r\n\r\nabc"),
    ("bad-length", b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc"),
    ("unknown-coding", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
]


@pytest.mark.parametrize("name,reply", AMBIGUOUS, ids=[a[0] for a in AMBIGUOUS])
def test_an_ambiguous_response_closes_the_connection_before_anything_reaches_the_client(
    gate: RunningGate, scripted: Scripted, name: str, reply: bytes
) -> None:
    scripted.reply = reply
    fast = decided(gate)
    answer = exchange(gate, get("raw.test", scripted.port) + get("raw.test", scripted.port, "/2"))
    assert decided(gate) == fast + 1, "the second request must never be decided"
    assert answer.closed
    assert answer.data == b"", f"forwarded part of an ambiguous response: {answer.data!r}"


@pytest.mark.parametrize(
    "shape",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # the narrow reader's shape
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n",  # h11's
    ],
    ids=["stated-length", "chunked"],
)
def test_a_response_head_over_the_bound_is_refused_even_when_it_comes_in_one_read(
    gate: RunningGate, scripted: Scripted, shape: bytes
) -> None:
    """A head over MAX_RESPONSE_HEAD (64 KiB) that arrives in a single segment: nothing of it
    reaches the client, and the connection closes (as for a head that comes in pieces)."""
    from addons.plainhttp import MAX_RESPONSE_HEAD

    filler = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    fields = filler * (MAX_RESPONSE_HEAD // len(filler) + 2)
    body = b"ok" if b"Content-Length" in shape else b"2\r\nok\r\n0\r\n\r\n"
    scripted.reply = shape + fields + b"\r\n" + body
    assert len(scripted.reply) < 128 * 1024  # within one read of the upstream
    answer = exchange(gate, get("raw.test", scripted.port))
    assert answer.closed
    assert answer.data == b"", f"forwarded part of an oversize head: {answer.data[:80]!r}"


def test_bytes_after_a_complete_response_close_the_connection(
    gate: RunningGate, scripted: Scripted
) -> None:
    """An upstream that sends a second response nobody asked for: the first goes to the client,
    then both connections close; the extra one is never taken for the next request's answer."""
    scripted.reply = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
    )
    fast = decided(gate)
    answer = exchange(
        gate, get("raw.test", scripted.port) + get("raw.test", scripted.port, "/2"), responses=2
    )
    assert answer.closed and b"smuggled" not in answer.data
    assert answer.statuses() == [200]
    assert decided(gate) == fast + 1


def test_a_chunked_response_is_relayed_whole(gate: RunningGate, scripted: Scripted) -> None:
    scripted.reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    with sock:
        sock.sendall(get("raw.test", scripted.port))
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(4096)
            assert chunk, f"closed early: {data!r}"
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[1]
    decoded, rest = b"", body
    for _ in range(16):  # bounded: a few chunks
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        decoded, rest = decoded + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
    assert decoded == b"abcde"


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the gate sends until it closes the connection (bounded by WAIT per read)."""
    data = b""
    for _ in range(10_000):  # bounded: each read returns something or ends the loop
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def test_informational_responses_are_relayed_up_to_a_bound(
    gate: RunningGate, scripted: Scripted
) -> None:
    """One or two 1xx before the final response (103 Early Hints) reach the client as sent; an
    upstream that sends them without end is closed, and nothing after the bound reaches the
    client (each one is a head the gate parses: an endless stream is work without a request)."""
    from addons.plainhttp import MAX_INFORMATIONAL

    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    for count, passes in ((2, True), (MAX_INFORMATIONAL, True), (MAX_INFORMATIONAL + 1, False)):
        scripted.reply = hints * count + final
        sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        with sock:
            sock.sendall(get("raw.test", scripted.port))
            data = _read_until_closed(sock)
        if passes:
            assert data.count(b" 103 Early Hints") == count
            assert data.endswith(b"\r\n\r\nok"), (count, data[-200:])
        else:
            assert b" 200 OK" not in data and data.count(b" 103 ") <= MAX_INFORMATIONAL


@pytest.mark.parametrize(
    "reply,close_after",
    [
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the upstream closes", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc", False),
    ],
    ids=["body-until-close", "connection-close", "http-1.0"],
)
def test_a_response_that_ends_the_upstream_connection_ends_the_client_connection(
    gate: RunningGate, scripted: Scripted, reply: bytes, close_after: bool
) -> None:
    """As mitmproxy does: the client connection closes after the response, and the pipelined
    request behind it is never decided."""
    scripted.reply, scripted.close_after = reply, close_after
    fast = decided(gate)
    answer = exchange(
        gate, get("raw.test", scripted.port) + get("raw.test", scripted.port, "/2"), responses=2
    )
    assert answer.closed
    assert answer.data.startswith(reply.split(b"\r\n", 1)[0])
    assert answer.data.endswith(reply.rsplit(b"\n", 1)[1])
    assert decided(gate) == fast + 1 and scripted.accepted == 1


def test_a_switch_of_protocols_nobody_asked_for_closes_the_connection_and_is_recorded(
    gate: RunningGate, mitm_gate: RunningGate, scripted: Scripted
) -> None:
    """Closed before anything of it reaches the client, and recorded as a refusal of the request
    it answered, as the mitmproxy adapter records it: the evidence says the switch was stopped."""
    scripted.reply = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nRAW BYTES"
    for running in (gate, mitm_gate):
        before = len(running.decisions)
        answer = exchange(running, get("raw.test", scripted.port))
        assert answer.closed and b"RAW BYTES" not in answer.data
        allowed, refused = waited_for(
            functools.partial(_records, running, before, 2), "the refusal record"
        )
        assert allowed.decision is Verdict.ALLOW
        assert refused.decision is Verdict.DENY and refused.reason == "unsupported"
        assert "switched protocols" in (refused.detail or "") and refused.host == "raw.test"


# -- parity: the same requests through the front end and through mitmproxy ---------------------


def _records(running: RunningGate, before: int, count: int) -> list[Decision]:
    """The ``count`` decisions recorded since ``before``, once they all are."""
    fresh = fresh_decisions(running, before)
    return fresh if len(fresh) >= count else []


def _masked(data: bytes) -> bytes:
    data = re.sub(rb"[0-9a-f]{32}", b"<id>", data)
    return re.sub(rb"policy:  [0-9a-f]+", b"policy:  <v>", data)


def test_the_front_end_and_mitmproxy_give_the_same_decisions_and_bytes(
    gate: RunningGate, mitm_gate: RunningGate, origin_a: Origin, origin_b: Origin
) -> None:
    a, b = origin_a.port, origin_b.port
    sequence = [
        get("a.test", a, "/x?token=secret&b"),
        get("denied.test", 80, "/nope"),
        get("a.test", a, method="HEAD"),
        f"GET http://a.test:{a}/ HTTP/1.1\r\nHost: b.test:{b}\r\n\r\n".encode(),
        get("b.test", b, "/b", b"X-Egress-Decision: allow\r\nAccept: */*\r\n"),
        get("127.0.0.1", a),
        get("a.test", b),
        # last: mitmproxy's refusal of a HEAD carries a body (which a client would read as the
        # next response); the front end's does not. Only the heads are compared.
        get("denied.test", 80, method="HEAD"),
    ]
    fast = decided(gate)
    before = len(gate.decisions), len(mitm_gate.decisions)
    replies = []
    for running in (gate, mitm_gate):
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=WAIT)
        got = []
        with sock:
            for request in sequence:
                sock.sendall(request)
                got.append(_read_response(sock, head_only=request.startswith(b"HEAD")))
        replies.append(got)
    assert decided(gate) == fast + len(sequence), "not all served by the front end"
    assert [_masked(r) for r in replies[0][:-1]] == [_masked(r) for r in replies[1][:-1]]
    head_only = replies[0][-1]
    assert head_only.endswith(b"\r\n\r\n") and head_only.count(b"\r\n\r\n") == 1
    assert _masked(head_only) == _masked(replies[1][-1]).split(b"\r\n\r\n")[0] + b"\r\n\r\n"

    def summary(decisions: list[Any]) -> list[tuple[Any, ...]]:
        return [
            (d.decision, d.reason, d.rule, d.kind, d.host, d.port, d.method, d.path, d.query)
            for d in decisions
        ]

    assert summary(fresh_decisions(gate, before[0])) == summary(
        fresh_decisions(mitm_gate, before[1])
    )


def _read_response(sock: socket.socket, *, head_only: bool) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the gate closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if head_only:
        return data
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the gate closed the connection"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_kept_alive_connection_with_no_next_request_is_closed_and_recorded(
    tmp_path: Path, dns: FakeDns, origin_a: Origin
) -> None:
    from proxy.core.limits import Limits

    policy = POLICY.format(a=origin_a.port, b=1, raw=2)
    running = start_gate_with(
        tmp_path, policy, dns.nameserver, config={"limits": Limits(idle_timeout=0.3)}
    )
    try:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=WAIT)
        with sock:
            sock.sendall(get("a.test", origin_a.port))
            assert recv_head(sock).startswith(b"HTTP/1.1 200")
            sock.settimeout(WAIT)
            rest = b""
            for _ in range(64):  # the body, then the close
                chunk = sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
            assert not chunk, "the idle connection was not closed"
        assert [d.reason for d in running.decisions][-1] == "idle-timeout"
        assert decided(running) == 1
    finally:
        running.stop()


def test_a_hand_over_mid_connection_is_not_counted_as_a_new_connection(
    tmp_path: Path, dns: FakeDns, origin_a: Origin
) -> None:
    """One new connection per client allowed: the request handed to mitmproxy after two served
    ones is on the same connection, so it is not refused by the new-connection rate."""
    from proxy.core.limits import Limits

    limits = Limits(new_connections_per_second=0.001, new_connections_burst=1)
    policy = POLICY.format(a=origin_a.port, b=1, raw=2)
    running = start_gate_with(tmp_path, policy, dns.nameserver, config={"limits": limits})
    try:
        post = (
            f"POST http://a.test:{origin_a.port}/p HTTP/1.1\r\nHost: a.test:{origin_a.port}\r\n"
            "Content-Length: 2\r\n\r\nok"
        ).encode()
        sequence = get("a.test", origin_a.port, "/1") + get("a.test", origin_a.port, "/2") + post
        reply = exchange(running, sequence, responses=3)
        assert reply.statuses() == [200, 200, 200]
        assert decided(running) == 2
        assert "rate-limit" not in [d.reason for d in running.decisions]
        # and the rate is enforced: a second connection is refused
        exchange(running, get("a.test", origin_a.port, "/3"))
        assert [d.reason for d in running.decisions][-1] == "rate-limit"
    finally:
        running.stop()


# -- responses without a body that announce a chunked one ----------------------------------------


def _until(sock: socket.socket, marker: bytes) -> bytes:
    """What arrives until ``marker`` has (or the gate closes; every wait bounded)."""
    data = b""
    sock.settimeout(WAIT)
    for _ in range(256):
        if marker in data:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize(
    "method,status",
    [("HEAD", "200 OK"), ("GET", "204 No Content"), ("GET", "304 Not Modified")],
    ids=["head", "204", "304"],
)
def test_a_bodiless_response_announcing_chunks_gets_no_body_from_the_gate(
    gate: RunningGate, scripted: Scripted, origin_a: Origin, method: str, status: str
) -> None:
    """A response to HEAD, a 204 and a 304 have no body whatever their head says (RFC 9112 6.3):
    the gate must not add a last chunk of its own, which the client would read as the start of
    the next response (here another host's)."""
    scripted.reply = f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    fast = decided(gate)
    sock = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    with sock:
        sock.sendall(get("raw.test", scripted.port, method=method) + get("a.test", origin_a.port))
        data = _until(sock, b"hello from a")
    assert decided(gate) == fast + 2
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(f"HTTP/1.1 {status}".encode())
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), f"bytes between the responses: {rest[:40]!r}"


# -- a client that never reads ------------------------------------------------------------------


class Flood(LoopbackServer):
    """An upstream answering with an endless body; says how its connection ended."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.how = ""
        super().__init__(threaded=True, name="upstream-flood")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        block = b"x" * 65536
        try:
            if not recv_head(conn):
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
            for _ in range(16384):  # at most 1 GiB: the gate stops taking long before
                conn.sendall(block)
            self.how = "all sent"
        except TimeoutError:
            self.how = "stalled"
        except OSError:
            self.how = "closed by the gate"
        finally:
            self.ended.set()


def test_a_client_that_never_reads_its_response_is_closed_after_the_idle_timeout(
    tmp_path: Path, dns: FakeDns
) -> None:
    """A sandbox that asks for a large response and never reads it must not hold a client
    connection and an upstream connection for ever: as a relayed tunnel that moves no byte, it is
    closed after the idle timeout and the closing recorded."""
    from proxy.core.limits import Limits

    flood = Flood()
    policy = POLICY.format(a=1, b=2, raw=flood.port)
    running = start_gate_with(
        tmp_path, policy, dns.nameserver, config={"limits": Limits(idle_timeout=0.3)}
    )
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(WAIT)
        with sock:
            sock.connect(("127.0.0.1", running.port))
            sock.sendall(get("raw.test", flood.port))
            assert flood.ended.wait(3 * WAIT), "the upstream is still sending"
            assert flood.how == "closed by the gate", flood.how
        assert decided(running) == 1
        assert [d.reason for d in running.decisions][-1] == "idle-timeout"
    finally:
        running.stop()
        flood.stop()


# -- one response must not hold the gate ---------------------------------------------------------


class TinyChunks(LoopbackServer):
    """An upstream answering with a chunked body of one-byte chunks, sent as fast as the gate takes
    them, until the gate closes the connection."""

    def __init__(self) -> None:
        super().__init__(threaded=True, name="upstream-tiny-chunks")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        block = b"1\r\nx\r\n" * 10_000
        try:
            if not recv_head(conn):
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(100_000):  # bounded; the test ends the stream long before
                conn.sendall(block)
        except OSError:
            pass


def test_a_response_of_many_small_chunks_does_not_hold_the_gate(
    tmp_path: Path, dns: FakeDns
) -> None:
    """A chunked response is parsed event by event, each costing far more than reading its bytes:
    an upstream sending one-byte chunks faster than the gate parses them never lets a read wait,
    and the client taking them never lets a send wait. Without a turn of the loop every so many
    events, the gate would serve nothing else - no other connection, no other sandbox - for as
    long as that one client keeps reading."""
    upstream = TinyChunks()
    policy = POLICY.format(a=1, b=2, raw=upstream.port)
    running = start_gate_with(tmp_path, policy, dns.nameserver)
    streaming = socket.create_connection(("127.0.0.1", running.port), timeout=WAIT)
    drained = threading.Event()

    def drain() -> None:
        try:
            while streaming.recv(1 << 20):
                drained.set()
        except OSError:
            pass

    reader = threading.Thread(target=drain, daemon=True)
    try:
        streaming.sendall(get("raw.test", upstream.port))
        reader.start()
        assert drained.wait(WAIT), "the response did not start"
        with socket.create_connection(("127.0.0.1", running.port), timeout=WAIT) as probe:
            probe.sendall(get("denied.test", 80))
            try:
                head = recv_head(probe)
            except TimeoutError:
                head = b""
        assert head.startswith(b"HTTP/1.1 403 "), "the gate answered no one else meanwhile"
    finally:
        with contextlib.suppress(OSError):
            streaming.shutdown(socket.SHUT_RDWR)
        reader.join(WAIT)
        streaming.close()
        running.stop()
        upstream.stop()


# -- an upstream connection given up is closed by the gate ---------------------------------------


class Late(LoopbackServer):
    """Answers each request head with ``reply`` a moment later (so the gate waits for it)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        super().__init__(threaded=True, name="upstream-late")

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        try:
            while recv_head(conn):
                time.sleep(0.05)
                conn.sendall(self.reply)
        except OSError:
            pass


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_upstream_connection_given_up_on_its_first_response_leaves_the_gate_working(
    tmp_path: Path, dns: FakeDns, origin_a: Origin, loop: str
) -> None:
    """A response the gate gives up on (bytes after its end, here; a body cut short or a client
    that went away end it the same way) closes the upstream connection it was dialled for. Left to
    the garbage collector, the socket was closed with the event loop still watching its
    descriptor: on uvloop the next socket given that number (the resolver's, say) was never woken,
    and every later request of every sandbox failed (``dns-failure`` after 3 s)."""
    hostile = Late(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    policy = POLICY.format(a=origin_a.port, b=1, raw=hostile.port)
    running = start_gate_with(tmp_path, policy, dns.nameserver, loop=loop)
    try:
        for _ in range(3):
            given_up = exchange(running, get("raw.test", hostile.port), responses=2)
            assert given_up.closed and given_up.data.endswith(b"\r\n\r\nok")
            for _ in range(2):
                reply = exchange(running, get("a.test", origin_a.port), idle=WAIT)
                assert reply.status == 200 and b"hello from a" in reply.data, reply.data[:120]
    finally:
        running.stop()
        hostile.stop()
