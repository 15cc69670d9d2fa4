"""What a refused client sees: stable headers, an actionable body, nothing it could use to forge."""

from __future__ import annotations

from mitmproxy import http

from addons.refusal import refusal_response, refusal_text, strip_egress_headers
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


def test_safety_refusals_do_not_suggest_an_allowlist_rule() -> None:
    text = refusal_text(denied(Reason.INTERNAL_ADDRESS, detail="resolves to 127.0.0.1"))
    assert "hosts: [" not in text and "report the decision id" in text


def test_proxy_auth_refusal_is_a_407_with_a_challenge() -> None:
    response = refusal_response(denied(Reason.PROXY_AUTH_REQUIRED), status=407)
    assert response.status_code == 407
    assert response.headers["Proxy-Authenticate"].startswith("Basic")


def test_client_controlled_method_and_path_are_escaped() -> None:
    text = refusal_text(denied(Reason.NO_MATCHING_RULE, method="G\x1b[2JET", path="/a\x00b\x7f"))
    assert "\x1b" not in text and "\x00" not in text and "\x7f" not in text
    assert "\\x1b" in text


def test_every_spelling_of_client_egress_headers_is_stripped() -> None:
    headers = http.Headers(
        [(b"X-Egress-Decision", b"allow"), (b"x_egress_rule", b"x"), (b"X-Other", b"kept")]
    )
    strip_egress_headers(headers)
    assert list(headers.keys()) == ["X-Other"]
