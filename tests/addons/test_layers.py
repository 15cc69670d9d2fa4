"""The layer chooser's own helpers (the layers themselves are exercised on a real gate in
tests/security)."""

from __future__ import annotations

from mitmproxy.connection import Client
from mitmproxy.proxy.layers.http._http1 import make_error_response

from addons.layers import parser_refusal, upstream_alpns


def test_a_parser_refusal_is_recorded_as_one_escaped_line() -> None:
    """mitmproxy answers a head it cannot parse with an HTML page quoting the client's bytes: the
    decision records its message, not the page, on one line and escaped."""
    page = make_error_response(400, 'Invalid HTTP request form\r\n"<script>" \x1b[31m\\')
    detail = parser_refusal(page)
    assert detail.startswith("the request head was refused as malformed: Invalid HTTP request form")
    assert "\n" not in detail and "\r" not in detail and "\x1b" not in detail
    assert "<html>" not in detail and "&lt;" not in detail and "&quot;" not in detail
    assert '"<script>"' in detail and "\\x1b[31m" in detail and detail.endswith("\\\\")


def test_a_refusal_page_without_a_message_is_still_one_line() -> None:
    assert parser_refusal(b"HTTP/1.1 400 Bad Request\r\n\r\n<html>\n</html>") == (
        "the request head was refused as malformed: unreadable"
    )


def test_a_long_message_is_clipped() -> None:
    detail = parser_refusal(make_error_response(400, "x" * 5000))
    assert len(detail) < 300 and detail.endswith("...")


def _client(offers: list[bytes]) -> Client:
    return Client(
        peername=("127.0.0.1", 1),
        sockname=("127.0.0.1", 2),
        timestamp_start=0.0,
        alpn_offers=offers,
    )


def test_an_inspected_upstream_is_offered_only_http() -> None:
    """mitmproxy would mirror the client's offers upstream: an upstream serving another protocol
    on the port could pick it and read the gate's judged HTTP requests as its commands."""
    assert upstream_alpns(_client([b"imap", b"h2", b"http/1.1", b"h2"])) == (b"h2", b"http/1.1")
    assert upstream_alpns(_client([b"http/1.1", b"xmpp-client"])) == (b"http/1.1",)
    assert upstream_alpns(_client([b"imap", b"http/1.0"])) == (b"http/1.1",)
    assert upstream_alpns(_client([])) == ()  # no ALPN: HTTP/1.1 by default
