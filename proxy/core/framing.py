"""Refuse HTTP requests whose destination is ambiguous, before any policy step looks at them.

A request is routed to one host and port (its URL authority, or the CONNECT tunnel it travels in).
Every other place it names an authority - the Host header, an absolute-form target inside a tunnel -
must name the same one, or a server or intermediary could route it elsewhere than the gate decided
(threat 5). Pure: plain strings in, an optional (reason, detail) out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.core.decision import Reason
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


def head_problem(method: str, target: str, fields: Sequence[tuple[bytes, bytes]]) -> Problem | None:
    """A complete request head over the caps: one client must not make the gate parse, log and
    forward arbitrarily many or long fields (threat 13). A head that arrived whole in one read was
    never measured while incomplete, so its size is checked here too. A field value with a line
    break or NUL in it is refused: the upstream may read it as two fields."""
    line = len(method) + len(target) + 10
    if line > MAX_REQUEST_LINE:
        return Reason.HEAD_TOO_LARGE, f"the request line is longer than {MAX_REQUEST_LINE} bytes"
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
]
