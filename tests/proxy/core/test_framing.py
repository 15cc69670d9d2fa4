"""Ambiguous HTTP framing is refused before policy: every authority a request names must be the one it
is routed to (threat 5)."""

from __future__ import annotations

import pytest

from proxy.core.decision import Reason
from proxy.core.framing import framing_problem, head_problem


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
