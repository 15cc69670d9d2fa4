"""Which plain-HTTP heads the front end takes, read exactly as mitmproxy reads them; response heads
it refuses to parse; and the per-request conditions that send a request to mitmproxy instead."""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.net.http.http1 import read_request_head

from addons.plainhttp import PlainHttp, _request_bytes, _Upstream, read_head, response_head_problem
from proxy.core.connections import Connection
from tests.harness import WAIT, RunningGate, answered_during_a_flood, recv_head, wait_until

TAKEN = [
    b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n",
    b"GET http://example.org:8080/a/b?x=1&y HTTP/1.1\r\nHost: Example.org:8080\r\n\r\n",
    b"HEAD http://10.1.2.3/x HTTP/1.1\r\nhost: 10.1.2.3\r\nAccept: */*\r\n\r\n",
    b"GET http://a.test/p?q=http://b/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    b"GET http://a.test/~u/%41 HTTP/1.1\r\nHost: a.test\r\nX-Egress-Rule: forged\r\n"
    b"Proxy-Authorization: Basic eDp5\r\nUser-Agent: a b\t c\r\n\r\n",
]


def _mitmproxy(raw: bytes) -> tuple[str, str, int, str, list[tuple[bytes, bytes]]]:
    lines = raw.split(b"\r\n\r\n")[0].split(b"\r\n")
    request = read_request_head([line + b"\r\n" for line in lines])
    return request.method, request.host, request.port, request.path, list(request.headers.fields)


@pytest.mark.parametrize("raw", TAKEN)
def test_a_taken_head_reads_as_mitmproxy_reads_it(raw: bytes) -> None:
    head = read_head(raw + b"GET next")
    assert head is not None and head.size == len(raw)
    method, host, port, path, fields = _mitmproxy(raw)
    assert (head.method, head.host, head.port, head.target) == (method, host, port, path)
    # the same fields, less the gate's own headers and the proxy credential
    kept = [f for f in fields if not f[0].lower().startswith((b"x-egress", b"proxy-auth"))]
    assert list(head.fields) == kept
    assert [head.host_header.encode()] == [v for k, v in fields if k.lower() == b"host"]


@given(
    st.from_regex(r"[a-z][a-z0-9]{0,10}(\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
    st.integers(1, 65535),
    st.from_regex(r"(/[A-Za-z0-9._~!$&'()*+,=:@%-]{0,12}){1,4}", fullmatch=True),
    st.lists(
        st.tuples(
            st.from_regex(r"X-[A-Za-z0-9-]{1,10}", fullmatch=True),
            st.from_regex(r"[!-~]([ -~]{0,20}[!-~])?", fullmatch=True),
        ),
        max_size=5,
    ),
)
def test_every_taken_head_reads_as_mitmproxy_reads_it(
    host: str, port: int, path: str, extra: list[tuple[str, str]]
) -> None:
    lines = [f"GET http://{host}:{port}{path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in extra]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    head = read_head(raw)
    if head is None:
        return  # mitmproxy's to serve: always safe
    method, m_host, m_port, m_path, fields = _mitmproxy(raw)
    assert (head.method, head.host, head.port, head.target) == (method, m_host, m_port, m_path)
    kept = [f for f in fields if not f[0].lower().startswith(b"x-egress")]
    assert list(head.fields) == kept


NOT_TAKEN = {
    "incomplete": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n",
    "post": b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n",
    "length": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n",
    "chunked": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
    "te-spaced": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n\r\n",
    "upgrade": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\n\r\n",
    "connection-upgrade": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n\r\n",
    "expect": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\n\r\n",
    "fold": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX: a\r\n b\r\n\r\n",
    "bare-lf": b"GET http://a.test/ HTTP/1.1\nHost: a.test\r\n\r\n",
    "bare-cr": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\rX: y\r\n\r\n",
    "no-host": b"GET http://a.test/ HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    "two-credentials": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n"
    b"Proxy-Authorization: a\r\nProxy-Authorization: b\r\n\r\n",
    "http10": b"GET http://a.test/ HTTP/1.0\r\nHost: a.test\r\n\r\n",
    "origin-form": b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "https": b"GET https://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "userinfo": b"GET http://u@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "decimal-ip": b"GET http://2130706433/ HTTP/1.1\r\nHost: 2130706433\r\n\r\n",
    "short-ip": b"GET http://127.1/ HTTP/1.1\r\nHost: 127.1\r\n\r\n",
    "trailing-dot": b"GET http://a.test./ HTTP/1.1\r\nHost: a.test.\r\n\r\n",
    "empty-label": b"GET http://a..test/ HTTP/1.1\r\nHost: a..test\r\n\r\n",
    "upper-case-host": b"GET http://A.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "ipv6": b"GET http://[::1]/ HTTP/1.1\r\nHost: [::1]\r\n\r\n",
    "port-zero": b"GET http://a.test:0/ HTTP/1.1\r\nHost: a.test:0\r\n\r\n",
    "leading-zero-port": b"GET http://a.test:080/ HTTP/1.1\r\nHost: a.test:080\r\n\r\n",
    "big-port": b"GET http://a.test:70000/ HTTP/1.1\r\nHost: a.test:70000\r\n\r\n",
    "no-path": b"GET http://a.test HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "double-slash": b"GET http://a.test//x HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "params": b"GET http://a.test/x;y HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "fragment": b"GET http://a.test/x#y HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "empty-query": b"GET http://a.test/x? HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "backslash": b"GET http://a.test/a\\b HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "two-spaces": b"GET  http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "non-ascii": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX: \xc3\xa9\r\n\r\n",
    "nul": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX: a\x00\r\n\r\n",
    "lower-method": b"get http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "http2-settings": b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHTTP2-Settings: x\r\n\r\n",
}


@pytest.mark.parametrize("raw", NOT_TAKEN.values(), ids=NOT_TAKEN.keys())
def test_an_unusual_head_is_left_to_mitmproxy(raw: bytes) -> None:
    assert read_head(raw) is None


AMBIGUOUS_HEADS = {
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 1\r\n",
    "bare-cr": b"HTTP/1.1 200 OK\rContent-Length: 1\r\n",
    "fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n",
    "nul": b"HTTP/1.1 200 OK\r\nX: a\x00\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\ncontent-length: 1\r\n",
    "length-and-coding": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n",
}


@pytest.mark.parametrize("head", AMBIGUOUS_HEADS.values(), ids=AMBIGUOUS_HEADS.keys())
def test_an_ambiguous_response_head_is_named(head: bytes) -> None:
    assert response_head_problem(head) is not None


def test_a_clean_response_head_in_pieces_is_not_refused_early() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: y\r\n"
    for cut in range(len(head) + 1):
        assert response_head_problem(head[:cut]) is None, head[:cut]


@dataclass
class _Declared:
    issued: bool


class _Checkpoint:
    def __init__(self, issued: bool | None, inspected: bool) -> None:
        self.credentials: Any = None if issued is None else (lambda: _Declared(issued))
        self._inspected = inspected
        self.identities = None

    def may_inspect(self, conn: Connection, host: str, port: int) -> bool:
        return self._inspected


@pytest.mark.parametrize(
    "issued,inspected,taken",
    [(None, False, True), (False, False, True), (True, False, False), (None, True, False)],
)
def test_requests_with_credentials_in_play_or_request_rules_go_to_mitmproxy(
    issued: bool | None, inspected: bool, taken: bool
) -> None:
    plain = PlainHttp(_Checkpoint(issued, inspected), idle_timeout=0)  # type: ignore[arg-type]
    head = read_head(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert head is not None
    assert plain.takes(Connection(peer=None, sandbox_id=None), head) is taken


@given(
    st.sampled_from(["GET", "HEAD"]),
    st.from_regex(r"[a-z][a-z0-9]{0,10}(\.[a-z][a-z0-9]{0,10}){0,3}", fullmatch=True),
    st.from_regex(
        r"(/[A-Za-z0-9._~!$&'()*+,=:@%-]{0,12}){1,4}(\?[A-Za-z0-9=&%/?]{1,8})?", fullmatch=True
    ),
    st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,10}", fullmatch=True),
            st.from_regex(r"[ \t]{0,2}[ -~\t]{0,20}[ \t]{0,2}", fullmatch=True),
        ),
        max_size=6,
    ),
)
def test_what_is_sent_upstream_is_the_head_h11_would_read(
    method: str, host: str, path: str, extra: list[tuple[str, str]]
) -> None:
    """The request goes upstream without h11: every head the front end takes must be one h11
    accepts and reads back as the same method, target and fields."""
    lines = [f"{method} http://{host}{path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}:{value}" for name, value in extra]
    head = read_head(("\r\n".join(lines) + "\r\n\r\n").encode())
    if head is None:
        return
    server = h11.Connection(h11.SERVER)
    server.receive_data(_request_bytes(head))
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method.decode(), request.target.decode()) == (head.method, head.target)
    assert list(request.headers.raw_items()) == list(head.fields)
    assert isinstance(server.next_event(), h11.EndOfMessage)  # and no body


def test_a_client_pipelining_refused_requests_does_not_hold_the_gate(tmp_path: Path) -> None:
    """A refused plain request needs no upstream and the next is already there: without a turn of
    the loop every few of them, one kept-alive connection's 2,000 pipelined refused requests would
    all be decided before the gate even accepted another client."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: one\n    hosts: [a.test]\n")
    gate = RunningGate(policy, ["127.0.0.1:9"]).start()
    try:
        count = 2000
        flood = b"GET http://10.9.9.9/ HTTP/1.1\r\nHost: 10.9.9.9\r\n\r\n"
        probe = b"GET http://10.8.8.8/ HTTP/1.1\r\nHost: 10.8.8.8\r\n\r\n"
        assert answered_during_a_flood(gate, flood, count, probe, "10.8.8.8") < count // 2
        assert gate.gate.tunnels.plain is not None
        assert gate.gate.tunnels.plain.decided >= count  # all on this path, none on mitmproxy's
    finally:
        gate.stop()


def test_a_kept_upstream_is_reused_only_with_nothing_waiting_on_it() -> None:
    """The next request goes on the kept upstream connection only when the upstream has sent
    nothing since the last response: no bytes nobody asked for, no end, and the same destination."""

    async def check() -> None:
        key = ("a.test", 80, "127.0.0.1")
        for sent, closed, expected in (
            (b"", False, True),
            (b"x", False, False),
            (b"", True, False),
        ):
            mine, theirs = socket.socketpair()
            mine.setblocking(False)
            upstream = _Upstream(mine, key)
            try:
                assert upstream.reusable(key)
                if sent:
                    theirs.send(sent)
                if closed:
                    theirs.close()
                assert upstream.reusable(key) is expected
                assert upstream.reusable(key) is expected  # asking again changes nothing
                assert not upstream.reusable(("b.test", 80, "127.0.0.1"))  # another destination
                upstream.idle = False
                assert not upstream.reusable(key)  # an exchange under way
            finally:
                upstream.close()
                theirs.close()

    asyncio.run(check())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_requests_left_by_a_client_that_reset_are_all_decided_and_the_connection_ends(
    tmp_path: Path, loop: str
) -> None:
    """A sandbox that ended leaves requests unread on a kept-alive connection (the gate sends it
    nothing more, ``conn.gone``) and a reset behind them. Each one is decided and recorded, then the
    connection ends: uvloop reports the reset once, with the bytes before it, and then stops
    watching the socket, so a wait begun before a read had found the reset would never end."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: one\n    hosts: [a.test]\n")
    gate = RunningGate(policy, ["127.0.0.1:9"], loop=loop).start()
    checkpoint = gate.gate.checkpoint

    def request(n: int) -> bytes:
        return b"GET http://10.9.9.%d/ HTTP/1.1\r\nHost: 10.9.9.%d\r\n\r\n" % (n, n)

    try:
        client = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
        for n in (1, 2):  # kept alive: its waits move to the loop's own registration
            client.sendall(request(n))
            assert recv_head(client).startswith(b"HTTP/1.1 403")
        for conn in checkpoint.connections.live():
            conn.gone = True
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sendall(request(3) + request(4) + request(5))
        client.close()  # a reset, behind the three requests
        hosts = {f"10.9.9.{n}" for n in (3, 4, 5)}
        assert wait_until(lambda: hosts <= {d.host for d in gate.decisions}), "not decided"
        assert wait_until(lambda: checkpoint.connections.active == 0), "the connection went on"
    finally:
        gate.stop()
