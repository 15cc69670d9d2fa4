"""The one reading of an HTTP request head that both adapters hand the checkpoint."""

from __future__ import annotations

from proxy.core.decision import Kind, Reason
from proxy.core.httpheads import (
    http_head,
    http_request,
    is_egress_header,
    plain_problem,
    shown_query,
)


def test_the_declared_body_size() -> None:
    assert http_head("GET", "/", []).body_size == 0
    assert http_head("GET", "/", [], multiplexed=True).body_size is None
    assert http_head("POST", "/", [(b"Content-Length", b"12")]).body_size == 12
    assert http_head("POST", "/", [(b"content-length", b"+12")]).body_size is None
    chunked = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")]
    assert http_head("POST", "/", chunked).body_size is None


def test_overrides_and_upgrade_are_read_whatever_their_spelling() -> None:
    head = http_head(
        "POST",
        "/x",
        [
            (b"X-HTTP-Method-Override", b"DELETE"),
            (b"UPGRADE", b"websocket"),
            (b"X-Method-Override", b"PUT"),
        ],
    )
    assert head.overrides == ("DELETE", "PUT") and head.upgrade == "websocket"


def test_overrides_spelled_with_underscores_are_overrides() -> None:
    """CGI, Rack and Puma map ``X_HTTP_METHOD_OVERRIDE`` to the dashed spelling's variable."""
    head = http_head(
        "POST",
        "/x",
        [
            (b"X_HTTP_METHOD_OVERRIDE", b"DELETE"),
            (b"x_method-override", b"PUT"),
            (b"X_HTTP_Method", b"PATCH"),
            (b"Content_Length", b"5"),  # not a framing field: only override names are mapped
            (b"X_Other_Header", b"GET"),
        ],
    )
    assert sorted(head.overrides) == ["DELETE", "PATCH", "PUT"]
    assert head.body_size == 0


def test_every_content_type_field_is_kept() -> None:
    """Servers keep the first, the last or all of repeated fields: the request step sees them all."""
    one = http_head("POST", "/", [(b"Content-Type", b"application/json")])
    assert one.content_type == "application/json"
    two = [(b"Content-Type", b"application/json"), (b"content-type", b"text/plain")]
    assert http_head("POST", "/", two).content_type == "application/json, text/plain"
    assert http_head("POST", "/", []).content_type is None


def test_every_content_encoding_field_is_kept() -> None:
    """Repeated Content-Encoding fields are one list: a body ``identity`` then ``gzip`` is
    compressed, so it is not read as it stands."""
    one = http_head("POST", "/", [(b"Content-Encoding", b"identity")])
    assert one.with_body(b"x").readable_body == b"x"
    two = [(b"Content-Encoding", b"identity"), (b"content-encoding", b"gzip")]
    head = http_head("POST", "/", two)
    assert head.content_encoding == "identity, gzip"
    assert head.with_body(b"x").readable_body is None
    assert http_head("POST", "/", []).content_encoding is None


def test_a_transfer_coding_other_than_chunked_is_a_coding_of_the_body() -> None:
    """``gzip, chunked``: the chunking is removed before the body is read, the gzip is not."""
    head = http_head("POST", "/", [(b"Transfer-Encoding", b"gzip, chunked")])
    assert head.body_size is None and head.with_body(b"x").readable_body is None
    chunked = http_head("POST", "/", [(b"Transfer-Encoding", b"Chunked")])
    assert chunked.content_encoding is None and chunked.with_body(b"x").readable_body == b"x"


def test_websocket_handshake_fields_make_a_websocket_request_without_upgrade() -> None:
    for name in (b"Sec-WebSocket-Version", b"sec-websocket-key", b"SEC_WEBSOCKET_PROTOCOL"):
        head = http_head("GET", "/", [(b"Host", b"a.test"), (name, b"13")])
        assert head.handshake and head.websocket, name
    plain = http_head("GET", "/", [(b"Sec-Fetch-Mode", b"cors"), (b"Sec-WebSocketx", b"1")])
    assert not plain.handshake and not plain.websocket
    upgrade = http_head("GET", "/", [(b"Upgrade", b"websocket")])
    assert upgrade.websocket and not upgrade.handshake
    other = http_head("GET", "/", [(b"Upgrade", b"h2c"), (b"Sec-WebSocket-Version", b"13")])
    assert not other.websocket  # refused by the request step as another protocol


def test_a_query_is_recorded_by_names_unless_values_are_asked_for() -> None:
    assert shown_query("token=abc&flag&x=1", False) == "token=&flag&x="
    # ';' separates parameters for the rules, so for the record too: no value hides a name
    assert shown_query("x=1;service=git-receive-pack&t=s;", False) == "x=;service=&t=;"
    assert shown_query("x=1;token=secret", True) == "x=1;token=secret"
    assert shown_query("token=abc", True) == "token=abc"
    request = http_request(Kind.HTTP, "a.test", 80, "GET", "/p?token=abc", [], query_values=False)
    assert (request.path, request.query, request.http and request.http.target) == (
        "/p",
        "token=",
        "/p?token=abc",
    )


def test_the_gates_own_headers_in_every_spelling() -> None:
    assert is_egress_header("X-Egress-Rule") and is_egress_header("x_egress_decision")
    assert not is_egress_header("X-Egressive")


def test_the_framing_step_for_a_plain_request() -> None:
    assert (
        plain_problem("GET", "/", "http", "a.test", 80, [(b"Host", b"a.test")], ["a.test"]) is None
    )
    mismatch = plain_problem("GET", "/", "http", "a.test", 80, [], ["b.test"])
    assert mismatch is not None and mismatch[0] is Reason.HOST_MISMATCH
    many = [(b"X-%d" % i, b"1") for i in range(101)]
    too_many = plain_problem("GET", "/", "http", "a.test", 80, many, ["a.test"])
    assert too_many is not None and too_many[0] is Reason.HEAD_TOO_LARGE


def test_the_framing_step_for_a_plain_request_holds_its_request_line_to_the_grammar() -> None:
    for method, target in (("GET /x", "/y"), ("GET", "//evil.test/x"), ("GET", "http://b.test/")):
        problem = plain_problem(method, target, "http", "a.test", 80, [], ["a.test"])
        assert problem is not None and problem[0] is Reason.BAD_REQUEST, (method, target)


def test_a_length_in_other_digits_is_read_as_unknown_not_raised_on() -> None:
    """A Content-Length byte such as 0xB2 reads as ``²`` in Latin-1, which ``str.isdigit`` takes
    for a digit and ``int`` refuses: reading the head must not raise (mitmproxy's parser refuses
    such a head, and the hook that records it runs all the same)."""
    for value in (b"\xb2", b"1\xb9", b"\xd9\xa1", b"9" * 5000):  # int() refuses 4,301 digits
        request = http_request(
            Kind.REQUEST, "a.test", 443, "POST", "/x", [(b"content-length", value)],
            query_values=False,
        )  # fmt: skip
        assert request.http is not None and request.http.body_size is None, value
