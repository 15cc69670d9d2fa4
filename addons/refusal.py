"""The refusal an HTTP client sees: machine-readable ``X-Egress-*`` headers and the core's text."""

from __future__ import annotations

from mitmproxy import http

from proxy.core.decision import Decision, Reason
from proxy.core.refusal import refusal_text

EGRESS_HEADER_PREFIX = "x-egress-"
_STATUS = {Reason.PROXY_AUTH_REQUIRED: 407, Reason.REQUEST_TOO_LARGE: 431, Reason.BAD_REQUEST: 400}


def strip_egress_headers(headers: http.Headers) -> None:
    """Client-sent ``X-Egress-*`` headers could forge a decision upstream or in logs: drop them all,
    including the ``X_Egress_*`` spelling that CGI/WSGI servers map to the same variable."""
    for name in [
        k for k in headers if k.lower().replace("_", "-").startswith(EGRESS_HEADER_PREFIX)
    ]:
        del headers[name]


def refusal_response(decision: Decision) -> http.Response:
    """407 asks for the shared gate's credential, 431 says the head was too large; every other
    refusal is a 403."""
    status = _STATUS.get(decision.reason, 403)
    headers = {
        "Content-Type": "text/plain; charset=utf-8",
        "X-Egress-Decision": str(decision.decision),
        "X-Egress-Rule": decision.rule or "-",
        "X-Egress-Reason": str(decision.reason),
        "X-Egress-Decision-Id": decision.id,
        "Cache-Control": "no-store",
    }
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="agent-egress"'
    return http.Response.make(status, refusal_text(decision), headers)
