"""Ambiguous HTTP framing is refused before policy: every authority a request names must be the one it
is routed to (threat 5)."""

from __future__ import annotations

import pytest

from proxy.core.decision import Reason
from proxy.core.fieldlines import is_token
from proxy.core.framing import framing_problem, head_problem, request_line_problem


@pytest.mark.parametrize(
    ("hosts", "authority"),
    [
        (["allowed.test"], None),
        (["allowed.test:80"], None),
        (["ALLOWED.test."], None),
        ([], None),  # HTTP/1.0 without Host: routed by the URL alone
        (["allowed.test"], "allowed.test:80"),
    ],
)
def test_same_authority_is_fine(hosts: list[str], authority: str | None) -> None:
    assert framing_problem("http", "allowed.test", 80, hosts, authority) is None


@pytest.mark.parametrize(
    ("hosts", "authority", "detail"),
    [
        (["evil.test"], None, "Host header names evil.test"),
        (["allowed.test:8080"], None, "Host header names allowed.test:8080"),
        (["allowed.test", "allowed.test"], None, "2 Host headers"),
        (["allowed.test"], "evil.test", "request target names evil.test"),
        (["user@allowed.test"], None, "not a valid host"),
        (["allowed.test:0"], None, "not a valid host"),
        (["::1"], None, "not a valid host"),  # IPv6 in a Host header needs brackets
        (["allowed.test\r\nX: y"], None, "not a valid host"),
        (["evil.test\x1b[2J"], None, "not a valid host"),
    ],
)
def test_another_authority_is_refused(hosts: list[str], authority: str | None, detail: str) -> None:
    problem = framing_problem("http", "allowed.test", 80, hosts, authority)
    assert problem is not None
    reason, text = problem
    assert reason is Reason.HOST_MISMATCH and detail in text
    assert text.isprintable()


def test_only_plain_http_is_proxied_as_http() -> None:
    problem = framing_problem("https", "allowed.test", 443, ["allowed.test"])
    assert problem is not None and problem[0] is Reason.UNSUPPORTED


@pytest.mark.parametrize(
    "value",
    [b"1\r\n Content-Length: 0", b"1\r\n\tx", b"1\rContent-Length: 0", b"1\nx", b"a\x00b"],
    ids=["obs-fold", "tab-fold", "bare-cr", "bare-lf", "nul"],
)
def test_a_field_value_with_a_line_break_or_nul_is_refused(value: bytes) -> None:
    problem = head_problem("GET", "/", [(b"Host", b"a.test"), (b"X-Pad", value)])
    assert problem is not None and problem[0] is Reason.BAD_REQUEST
    assert "X-Pad" in problem[1]


def test_tabs_and_visible_bytes_in_a_field_value_pass() -> None:
    assert head_problem("GET", "/", [(b"X-A", b"a\tb c~\x80\xff")]) is None


@pytest.mark.parametrize(
    "method",
    ["GET", "get", "M-SEARCH", "PROPFIND", "VERSION-CONTROL", "X!#$%&'*+-.^_`|~09"],
)
def test_a_token_is_a_method(method: str) -> None:
    assert is_token(method)
    assert head_problem(method, "/", []) is None


@pytest.mark.parametrize(
    "method",
    ["", "GET /evil/secret", "GET\t", "G\x00ET", "G(E)T", 'G"ET', "GET:", "G\u00c9T", "GE\u017fT"],
    ids=["empty", "space", "tab", "nul", "parens", "quote", "colon", "latin-1", "long-s"],
)
def test_a_method_that_is_not_a_token_is_a_bad_request(method: str) -> None:
    """HTTP/2 carries ``:method`` as a field value: an inner space moves the target an HTTP/1
    upstream reads (finding 5)."""
    assert not is_token(method)
    problem = head_problem(method, "/myorg/x", [])
    assert problem is not None and problem[0] is Reason.BAD_REQUEST
    assert "not a token" in problem[1] and problem[1].isprintable()


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/"),
        ("GET", "/a/b?c=d&e"),
        ("GET", "/a//b"),  # an empty segment inside: for the path rules to call ambiguous
        ("OPTIONS", "*"),
        ("CONNECT", "allowed.test:443"),  # authority-form, judged at the CONNECT
    ],
)
def test_origin_form_targets_pass(method: str, target: str) -> None:
    assert request_line_problem(method, target) is None
    assert head_problem(method, target, []) is None


@pytest.mark.parametrize(
    ("method", "target", "detail"),
    [
        ("GET", "https://evil.test/x", "not origin-form"),
        ("GET", "http://evil.test/x", "not origin-form"),
        ("GET", "evil.test:443", "not origin-form"),
        ("GET", "myorg/x", "not origin-form"),
        ("GET", "", "not origin-form"),
        ("GET", "*", "not origin-form"),
        ("options", "*", "not origin-form"),
        ("GET", "//evil.test/x", "starts with '//'"),
        ("GET", "///x", "starts with '//'"),
        ("GET", "/x /evil", "space or control"),
        ("GET", "/x\t", "space or control"),
        ("GET", "/x\x01", "space or control"),
        ("GET", "/x\x7f", "space or control"),
        ("GET", " /x", "space or control"),
    ],
)
def test_a_target_that_is_not_origin_form_is_a_bad_request(
    method: str, target: str, detail: str
) -> None:
    """An HTTP/2 ``:path`` goes verbatim into the HTTP/1 upstream's request line: in absolute
    form it names the host the server routes to (finding 4); ``//host`` is one to URI parsers."""
    problem = head_problem(method, target, [])
    assert problem is not None and problem[0] is Reason.BAD_REQUEST
    assert detail in problem[1] and problem[1].isprintable()


def test_the_request_line_is_checked_before_the_fields() -> None:
    problem = head_problem("GET", "https://evil.test/", [(b"X", b"a\r\nb")])
    assert problem is not None and "origin-form" in problem[1]
