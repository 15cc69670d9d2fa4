"""What a refused client sees: stable headers, an actionable body, nothing it could use to forge."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http

from addons.refusal import _header_safe, refusal_bytes, refusal_response, strip_egress_headers
from proxy.core.decision import Decision, Kind, Reason, Verdict


def denied(reason: Reason, **fields: object) -> Decision:
    base = Decision(Verdict.DENY, reason, None, Kind.HTTP, "evil.test", 80, "v1", "enforce")
    return base.with_(**fields) if fields else base


def test_headers_and_body_name_the_refusal_and_how_to_get_access() -> None:
    response = refusal_response(denied(Reason.NO_MATCHING_RULE, method="GET", path="/x"))
    assert response.status_code == 403
    assert response.headers["X-Egress-Decision"] == "deny"
    assert response.headers["X-Egress-Rule"] == "-"
    assert response.headers["X-Egress-Reason"] == "no-matching-rule"
    text = response.get_text()
    assert text is not None
    assert "GET evil.test:80 /x" in text
    assert "restricted by policy" in text and "hosts: [evil.test]" in text and "ports: [80]" in text


def test_proxy_auth_refusal_is_a_407_with_a_challenge() -> None:
    response = refusal_response(denied(Reason.PROXY_AUTH_REQUIRED))
    assert response.status_code == 407
    assert response.headers["Proxy-Authenticate"].startswith("Basic")


def test_every_other_refusal_is_a_403_without_a_challenge() -> None:
    response = refusal_response(denied(Reason.INTERNAL_ADDRESS))
    assert response.status_code == 403 and "Proxy-Authenticate" not in response.headers


def test_every_spelling_of_client_egress_headers_is_stripped() -> None:
    headers = http.Headers(
        [(b"X-Egress-Decision", b"allow"), (b"x_egress_rule", b"x"), (b"X-Other", b"kept")]
    )
    strip_egress_headers(headers)
    assert list(headers.keys()) == ["X-Other"]


@given(st.text(max_size=40))
def test_a_header_value_keeps_printable_ascii_only(value: str) -> None:
    """Every character outside " " to "~" becomes "?", so no value can end its header line early
    or add one (the common all-printable value is returned as it is)."""
    safe = _header_safe(value)
    assert len(safe) == len(value)
    assert all(" " <= c <= "~" for c in safe)
    assert all(
        s == v or (s == "?" and not " " <= v <= "~") for s, v in zip(safe, value, strict=True)
    )


def test_a_refusals_header_values_cannot_add_a_line() -> None:
    head = refusal_bytes(denied(Reason.NO_MATCHING_RULE, rule="r\r\nSet-Cookie: x\x7f\u2028"))
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b"X-Egress-Rule: r??Set-Cookie: x??" in lines
    assert not [line for line in lines if line.startswith(b"Set-Cookie")]
