"""The refusal an HTTP client sees: machine-readable ``X-Egress-*`` headers and the core's text, as a
mitmproxy response or as raw HTTP/1.1 bytes (the tunnel front end) - the same refusal either way."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING

from proxy.core.decision import Decision, Reason
from proxy.core.httpheads import is_egress_header
from proxy.core.refusal import refusal_text

if TYPE_CHECKING:  # mitmproxy is imported only where a response object is made
    from mitmproxy import http

_STATUS = {
    Reason.PROXY_AUTH_REQUIRED: 407,
    Reason.HEAD_TOO_LARGE: 431,
    Reason.BAD_REQUEST: 400,
}


def strip_egress_headers(headers: http.Headers) -> None:
    """Client-sent ``X-Egress-*`` headers could forge a decision upstream or in logs: drop them all,
    including the ``X_Egress_*`` spelling that CGI/WSGI servers map to the same variable."""
    for name in [k for k in headers if is_egress_header(k)]:
        del headers[name]


def refusal_response(decision: Decision, status: int | None = None) -> http.Response:
    from mitmproxy import http

    status, reason, headers = refusal_head(decision, status)
    response = http.Response.make(status, refusal_text(decision), headers)
    response.reason = reason
    return response


def refusal_bytes(decision: Decision, *, close: bool = True) -> bytes:
    """The same refusal as one HTTP/1.1 response (the tunnel front end)."""
    status, reason, headers = refusal_head(decision)
    body = refusal_text(decision).encode()
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {_header_safe(value)}" for name, value in headers.items()]
    # spelled as mitmproxy's responses spell it: the same refusal, byte for byte, from either path
    lines += [f"content-length: {len(body)}", *(["Connection: close"] if close else []), "", ""]
    return "\r\n".join(lines).encode() + body


def refusal_head(decision: Decision, status: int | None = None) -> tuple[int, str, dict[str, str]]:
    """Status, reason phrase and headers. 407 asks for the shared gate's credential, 431 says the
    head was too large, 400 that it did not parse; every other refusal is a 403 unless ``status``
    says otherwise (421 for an HTTP/2 request naming another authority). Clients that print only the
    status line (pip, npm, requests' raise_for_status) still say who refused and why; HTTP/2 has no
    reason phrase and drops it."""
    if status is None:
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
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Refused"
    return status, f"{phrase} by agent-egress ({decision.reason})", headers


def _header_safe(value: str) -> str:
    """No control character may end a header line early (mitmproxy's Headers refuse them too)."""
    if value.isascii() and value.isprintable():  # printable ASCII: " " to "~", the usual value
        return value
    return "".join(c if " " <= c < "\x7f" else "?" for c in value)
