"""Refuse HTTP requests whose destination is ambiguous, before any policy step looks at them.

A request is routed to one host and port (its URL authority, or the CONNECT tunnel it travels in).
Every other place it names an authority - the Host header, an absolute-form target inside a tunnel -
must name the same one, or a server or intermediary could route it elsewhere than the gate decided
(threat 5). What goes upstream is a request line the gate judged: a token for a method, and an
origin-form target (threat 16). Pure: plain strings in, an optional (reason, detail) out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.core.decision import Reason
from proxy.core.fieldlines import is_token
from proxy.core.hosts import InvalidHost, canonical_host, split_authority
from proxy.core.text import escape

Problem = tuple[Reason, str]

MAX_REQUEST_HEAD = 64 * 1024  # request line and headers, buffered before they are complete
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADERS = 100
# A field value holding one of these (mitmproxy keeps an obs-fold's CRLF in the value it forwards)
# ends the field early for parsers that split there, and the rest of the line becomes a field of its
# own - a second Content-Length, say - that the gate never judged (RFC 9110 5.5: reject, threat 16).
_LINE_BREAK = re.compile(rb"[\r\n\x00]")
# a byte that ends or splits a request target (HTTP/2 can carry a space in :path, HTTP/1 a control)
_TARGET_BREAK = re.compile(r"[\x00-\x20\x7f]")


def head_problem(method: str, target: str, fields: Sequence[tuple[bytes, bytes]]) -> Problem | None:
    """A complete request head over the caps: one client must not make the gate parse, log and
    forward arbitrarily many or long fields (threat 13). A head that arrived whole in one read was
    never measured while incomplete, so its size is checked here too. A field value with a line
    break or NUL in it is refused: the upstream may read it as two fields. A method that is not a
    token, or a target that is not origin-form, is refused (:func:`request_line_problem`).

    Every request passes here - HTTP/1 and HTTP/2, inspected and plain, mitmproxy's and the gate's
    own plain-HTTP path - with ``target`` as it will be written upstream (mitmproxy has already
    turned an HTTP/1 absolute-form target into origin-form and checks its authority apart)."""
    line = len(method) + len(target) + 10
    if line > MAX_REQUEST_LINE:
        return Reason.HEAD_TOO_LARGE, f"the request line is longer than {MAX_REQUEST_LINE} bytes"
    problem = request_line_problem(method, target)
    if problem is not None:
        return Reason.BAD_REQUEST, problem
    if len(fields) > MAX_HEADERS:
        return Reason.HEAD_TOO_LARGE, f"{len(fields)} header fields; at most {MAX_HEADERS}"
    size = line
    for name, value in fields:
        size += len(name) + len(value) + 4
        if _LINE_BREAK.search(value) is not None:
            return Reason.BAD_REQUEST, (
                f"header field {escape(name.decode('latin-1'))!r} has a CR, LF or NUL in its value "
                "(a folded line); send each field on one line"
            )
    if size > MAX_REQUEST_HEAD:
        return Reason.HEAD_TOO_LARGE, f"the request head is larger than {MAX_REQUEST_HEAD} bytes"
    return None


def request_line_problem(method: str, target: str) -> str | None:
    """Why ``method`` and ``target`` must not be written into an upstream request line, or None.

    - The method must be an RFC 9110 token: HTTP/2 carries ``:method`` as a field value, so
      ``GET /evil x`` arrives whole, and an HTTP/1 upstream would read a different method and path
      than the gate judged.
    - The target must be origin-form (``/path?query``), or ``*`` for ``OPTIONS``; a CONNECT's is
      its authority, judged at the CONNECT. An HTTP/2 ``:path`` in absolute or authority form
      (``https://evil.test/x``, ``evil.test:443``) is written verbatim into the upstream's request
      line, where RFC 9112 3.2.2 has the server route by it and ignore Host (RFC 9113 8.3.1 allows
      neither form for ``https``). A space or control character in it would split that line.
    - A target starting with ``//`` is origin-form by RFC 9112's grammar but a network-path
      reference to URI parsers (RFC 3986 4.2): ``new URL("//evil.test/x", base)``, ``urlsplit`` and
      ``URI.parse`` read ``evil.test`` as its authority. No path rule allows one (an empty segment)
      and no client needs one, so it is refused outright rather than left to each server.
    """
    if not is_token(method):
        return (
            f"the method {escape(method, 64)!r} is not a token (RFC 9110 9.1: letters, digits and "
            "!#$%&'*+-.^_`|~ only)"
        )
    if method == "CONNECT":
        return None
    if _TARGET_BREAK.search(target) is not None:
        return f"the request target {escape(target, 64)!r} holds a space or control character"
    if target.startswith("/"):
        if target.startswith("//"):
            return (
                f"the request target {escape(target, 64)!r} starts with '//', which URI parsers "
                "read as another authority; send a single '/'"
            )
        return None
    if target == "*" and method == "OPTIONS":
        return None
    return (
        f"the request target {escape(target, 64)!r} is not origin-form; send '/path?query' "
        "(and name the host in Host or :authority)"
    )


def framing_problem(
    scheme: str,
    routed_host: str,
    routed_port: int,
    host_headers: Sequence[str],
    named_authority: str | None = None,
) -> Problem | None:
    """``named_authority`` is an absolute-form request target's authority, when the request had one."""
    if scheme != "http":
        return (
            Reason.UNSUPPORTED,
            f"scheme {escape(scheme)!r} is not proxied as plain HTTP; use CONNECT",
        )
    if len(host_headers) > 1:
        return Reason.HOST_MISMATCH, f"{len(host_headers)} Host headers; send exactly one"
    named = [(value, "Host header") for value in host_headers]
    if named_authority:
        named.append((named_authority, "request target"))
    return authority_problem(routed_host, routed_port, named)


def authority_problem(
    routed_host: str, routed_port: int, named: Sequence[tuple[str, str]]
) -> Problem | None:
    """Each (authority, what) in ``named`` must be ``routed_host:routed_port``."""
    for value, what in named:
        try:
            host, port = split_authority(value, routed_port, bare_ipv6=False)
            same = canonical_host(host) == canonical_host(routed_host) and port == routed_port
        except InvalidHost:
            return Reason.HOST_MISMATCH, f"the {what} is not a valid host[:port]"
        if not same:
            return (
                Reason.HOST_MISMATCH,
                f"the {what} names {escape(value)} but the request is routed to "
                f"{escape(routed_host)}:{routed_port}",
            )
    return None


__all__ = [
    "MAX_HEADERS",
    "MAX_REQUEST_HEAD",
    "MAX_REQUEST_LINE",
    "Problem",
    "authority_problem",
    "framing_problem",
    "head_problem",
    "request_line_problem",
]
