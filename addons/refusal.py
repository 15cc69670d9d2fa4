"""The refusal an HTTP client sees: machine-readable ``X-Egress-*`` headers and the core's text."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.core.decision import Decision, Reason
from proxy.core.refusal import refusal_text

if TYPE_CHECKING:  # mitmproxy is imported only where a response object is made
    from mitmproxy import http

EGRESS_HEADER_PREFIX = "x-egress-"


def strip_egress_headers(headers: http.Headers) -> None:
    """Client-sent ``X-Egress-*`` headers could forge a decision upstream or in logs: drop them all,
    including the ``X_Egress_*`` spelling that CGI/WSGI servers map to the same variable."""
    for name in [
        k for k in headers if k.lower().replace("_", "-").startswith(EGRESS_HEADER_PREFIX)
    ]:
        del headers[name]


def refusal_response(decision: Decision) -> http.Response:
    from mitmproxy import http

    status, headers = refusal_head(decision)
    return http.Response.make(status, refusal_text(decision), headers)


def refusal_bytes(decision: Decision, *, close: bool = True) -> bytes:
    """The same refusal as one HTTP/1.1 response (the tunnel front end)."""
    status, headers = refusal_head(decision)
    body = refusal_text(decision).encode()
    reason = "Proxy Authentication Required" if status == 407 else "Forbidden"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {_header_safe(value)}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", *(["Connection: close"] if close else []), "", ""]
    return "\r\n".join(lines).encode() + body


def refusal_head(decision: Decision) -> tuple[int, dict[str, str]]:
    """407 asks for the shared gate's credential; every other refusal is a 403."""
    status = 407 if decision.reason is Reason.PROXY_AUTH_REQUIRED else 403
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
    return status, headers


def _header_safe(value: str) -> str:
    """No control character may end a header line early (mitmproxy's Headers refuse them too)."""
    return "".join(c if " " <= c < "\x7f" else "?" for c in value)
