"""The narrow response-head reader frames every head it takes exactly as h11 frames it (and closes
the client connection exactly where mitmproxy would); everything unusual is left to h11."""

from __future__ import annotations

import h11
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mitmproxy.http import Headers
from mitmproxy.net.http.http1.read import connection_close

from addons.plainhttp import response_head_problem
from proxy.core.responseframing import ResponseHead, read_response_head


def _read(raw: bytes, method: str = "GET") -> ResponseHead | None:
    return read_response_head(raw, raw.find(b"\r\n\r\n"), method)


# -- each framing rule the reader takes over ---------------------------------------------------


def test_a_stated_length_frames_the_body() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello"
    head = _read(raw)
    assert head is not None
    assert (head.size, head.length, head.announced) == (len(raw) - 5, 5, 5)
    assert head.head == raw[:-5]
    assert head.keep_alive and not head.closes


@pytest.mark.parametrize(
    "method,status", [("HEAD", 200), ("GET", 204), ("GET", 304), ("HEAD", 404)]
)
def test_a_response_without_a_body_has_none_whatever_its_length_says(
    method: str, status: int
) -> None:
    head = _read(f"HTTP/1.1 {status} X\r\nContent-Length: 7\r\n\r\n".encode(), method)
    assert head is not None and head.length == 0 and head.announced == 7


def test_a_response_without_a_body_needs_no_length() -> None:
    head = _read(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert head is not None and (head.length, head.announced) == (0, 0)
    assert head.head == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_padding_around_values_is_dropped_as_h11_drops_it() -> None:
    head = _read(b"HTTP/1.1 200 OK\r\nContent-Length:\t 2 \r\nX-A:a  b \r\n\r\nhi")
    assert head is not None and head.length == 2
    assert head.head == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a  b\r\n\r\n"


@pytest.mark.parametrize(
    "version,connection,closes,keep_alive",
    [
        ("1.1", None, False, True),
        ("1.1", "close", True, False),
        ("1.1", "Keep-Alive, Close", True, False),
        ("1.1", "keep-alive", False, True),
        ("1.0", None, True, False),
        ("1.0", "keep-alive", False, False),  # mitmproxy keeps the client; h11 not the upstream
        ("1.0", "close", True, False),
    ],
)
def test_who_closes_after_the_response(
    version: str, connection: str | None, closes: bool, keep_alive: bool
) -> None:
    field = f"Connection: {connection}\r\n" if connection else ""
    head = _read(f"HTTP/{version} 200 OK\r\n{field}Content-Length: 0\r\n\r\n".encode())
    assert head is not None and (head.closes, head.keep_alive) == (closes, keep_alive)


LEFT_TO_H11 = {
    "informational": b"HTTP/1.1 100 Continue\r\n\r\n",
    "switching": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "chunked-head": b"HTTP/1.1 204 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "until-close": b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
    "no-reason": b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    "http-0.9-ish": b"HTTP/0.9 200 OK\r\nContent-Length: 0\r\n\r\n",
    "http-2": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "status-600": b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n",
    "length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
    "bad-length": b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc",
    "signed-length": b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
    "empty-length": b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
    "huge-length": b"HTTP/1.1 200 OK\r\nContent-Length: 123456789012345678901\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    "obs-text": b"HTTP/1.1 200 OK\r\nX: \xe9\r\nContent-Length: 0\r\n\r\n",
    "obs-text-reason": b"HTTP/1.1 200 \xe9\r\nContent-Length: 0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "no-colon": b"HTTP/1.1 200 OK\r\nContent-Length 0\r\n\r\n",
    "empty-name": b"HTTP/1.1 200 OK\r\n: x\r\nContent-Length: 0\r\n\r\n",
    "lower-http": b"http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "two-spaces": b"HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n",
    "vertical-tab": b"HTTP/1.1 200 OK\r\nX: a\x0bb\r\nContent-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("raw", LEFT_TO_H11.values(), ids=LEFT_TO_H11.keys())
def test_anything_unusual_is_left_to_h11(raw: bytes) -> None:
    assert _read(raw) is None


# -- every head it takes, against h11 -----------------------------------------------------------

_NAMES = st.sampled_from(
    [
        "Content-Length",
        "content-length",
        "CONTENT-LENGTH",
        "Transfer-Encoding",
        "Connection",
        "connection",
        "Server",
        "X-A",
        "Keep-Alive",
        "Upgrade",
    ]
) | st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,8}", fullmatch=True)
_VALUES = st.sampled_from(
    [
        "0",
        "3",
        "007",
        "5",
        "12345678901234567890",
        "123456789012345678901",
        "3, 3",
        "3x",
        "",
        "chunked",
        "gzip",
        "close",
        "Close",
        "keep-alive",
        "keep-alive, close",
        "Upgrade",
        "a b",
    ]
) | st.text(st.characters(min_codepoint=9, max_codepoint=0xFF), max_size=8)
_PAD = st.sampled_from(["", " ", "\t", "  ", " \t"])


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, str]:
    version = draw(st.sampled_from(["1.1", "1.1", "1.0", "0.9", "2.0"]))
    status = draw(st.sampled_from([200, 204, 206, 304, 404, 503, 100, 101, 199, 600, 999]))
    reason = draw(st.none() | st.sampled_from(["OK", "", "Not Found", "a\tb ", "\xe9"]))
    line = f"HTTP/{version} {status}" + ("" if reason is None else f" {reason}")
    fields = draw(
        st.lists(st.tuples(_NAMES, _PAD, _VALUES, _PAD, st.sampled_from([":", ":", " :"])))
    )
    head = line + "".join(f"\r\n{n}{c}{a}{v}{b}" for n, a, v, b, c in fields) + "\r\n\r\n"
    body = draw(st.binary(max_size=24))
    method = draw(st.sampled_from(["GET", "HEAD"]))
    return head.encode("latin-1") + body, method


@st.composite
def plain_responses(draw: st.DrawFn) -> tuple[bytes, str]:
    """Mostly heads the reader takes, each with a twist or two."""
    version = draw(st.sampled_from(["1.1", "1.0"]))
    status = draw(st.sampled_from([200, 204, 206, 304, 404, 503, 101, 600]))
    reason = draw(st.sampled_from(["OK", "", "Not Found", "a\tb "]))
    fields = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["Server", "X-A", "Connection", "ETag", "Content-Length"]),
                _PAD,
                st.sampled_from(["x", "a b", "close", "keep-alive", "Keep-Alive, x", "9", ""]),
                _PAD,
            ),
            max_size=4,
        )
    )
    length = draw(st.none() | st.integers(0, 30) | st.just(10**20))
    lines = [f"HTTP/{version} {status} {reason}"]
    lines += [f"{n}:{a}{v}{b}" for n, a, v, b in fields if n != "Content-Length"]
    if length is not None:
        lines.insert(draw(st.integers(1, len(lines))), f"Content-Length: {length}")
    body = draw(st.binary(max_size=40))
    method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, method


def _h11_head(event: h11.Response) -> bytes:
    lines = [b"HTTP/%s %d %s" % (event.http_version, event.status_code, event.reason)]
    lines += [name + b": " + value for name, value in event.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=1500)
@given(responses() | plain_responses())
@example((b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA", "GET"))
@example((b"HTTP/1.0 304 X\r\nConnection: keep-alive\r\nContent-Length: 9\r\n\r\n", "GET"))
def test_every_head_it_takes_is_framed_as_h11_frames_it(response: tuple[bytes, str]) -> None:
    raw, method = response
    end = raw.find(b"\r\n\r\n")
    if response_head_problem(raw[: end + 2]) is not None:
        return  # refused before either reads it
    head = read_response_head(raw, end, method)
    if head is None:
        return  # h11's to read, as before
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method=method, target="/", headers=[("Host", "a.test")]))
    parser.send(h11.EndOfMessage())
    parser.receive_data(raw)
    event = parser.next_event()  # raises where h11 would refuse the head: a test failure
    assert isinstance(event, h11.Response)
    assert head.size == end + 4
    assert head.head == _h11_head(event)
    body = b""
    for _ in range(len(raw) + 2):
        event = parser.next_event()
        if isinstance(event, h11.Data):
            body += event.data
            continue
        break
    if event is h11.NEED_DATA:  # a body longer than what was received
        assert len(raw) - head.size < head.length
        assert body == raw[head.size :]
    else:
        assert isinstance(event, h11.EndOfMessage)
        assert len(body) == head.length
        assert body == raw[head.size : head.size + head.length]
        assert bool(parser.trailing_data[0]) == (len(raw) > head.size + head.length)
        try:
            parser.start_next_cycle()
            again = True
        except h11.LocalProtocolError:
            again = False
        assert head.keep_alive == again
    parsed = h11.Connection(h11.CLIENT)
    parsed.send(h11.Request(method=method, target="/", headers=[("Host", "a.test")]))
    parsed.send(h11.EndOfMessage())
    parsed.receive_data(raw[: head.size])
    response_event = parsed.next_event()
    assert isinstance(response_event, h11.Response)
    # mitmproxy's rule, with the tokens compared without case (as RFC 9110 says, and as the
    # front end has always compared them)
    fields = Headers([(n, v.lower()) for n, v in response_event.headers.raw_items()])
    version = b"HTTP/" + response_event.http_version
    assert head.closes == connection_close(version, fields)
    lengths = [
        int(v) for n, v in response_event.headers.raw_items() if n.lower() == b"content-length"
    ]
    assert head.announced == (lengths[0] if lengths else 0)


@settings(max_examples=1000)
@given(responses() | plain_responses())
def test_every_head_it_takes_passes_the_raw_checks(response: tuple[bytes, str]) -> None:
    """The front end skips the raw checks for a head the reader takes: its grammar must be the
    stricter of the two."""
    raw, method = response
    end = raw.find(b"\r\n\r\n")
    if read_response_head(raw, end, method) is not None:
        assert response_head_problem(raw[: end + 2]) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\rContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 1\r\n\r\nx",
    ],
)
def test_no_ambiguous_head_is_taken(raw: bytes) -> None:
    assert response_head_problem(raw[: raw.find(b"\r\n\r\n") + 2]) is not None
    assert _read(raw) is None and _read(raw, "HEAD") is None
