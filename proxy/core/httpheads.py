"""What the checkpoint is given for one HTTP request head, from plain values.

Both adapters that serve HTTP requests - mitmproxy's layers (:mod:`addons.gate`) and the gate's own
plain-HTTP path (:mod:`addons.plainhttp`) - read a head into the same :class:`Request` and the same
framing problem here, so a request is decided the same way whichever serves it. Pure: no I/O, no
mitmproxy; header fields are ``(name, value)`` byte pairs as parsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.core.decision import Kind, Request
from proxy.core.fieldlines import websocket_field
from proxy.core.framing import Problem, framing_problem, head_problem
from proxy.core.requests import OVERRIDE_HEADERS, HttpHead

Fields = Sequence[tuple[bytes, bytes]]

EGRESS_HEADER_PREFIX = "x-egress-"

_OVERRIDE_KEYS = tuple(name.encode() for name in OVERRIDE_HEADERS)
_OVERRIDE_NAMES = frozenset(_OVERRIDE_KEYS)
_HEAD_FIELDS = frozenset(
    {
        *(name.encode() for name in OVERRIDE_HEADERS),
        b"upgrade",
        b"content-length",
        b"transfer-encoding",
        b"content-type",
        b"content-encoding",
    }
)

_QUERY_SEPARATOR = re.compile("([&;])")  # kept in the split, so the record keeps its separators

_SEC = (b"sec-", b"sec_")  # a cheap first look before websocket_field


def is_egress_header(name: str) -> bool:
    """A client-sent ``X-Egress-*`` header could forge a decision upstream or in logs; the
    ``X_Egress_*`` spelling counts too (CGI/WSGI servers map both to the same variable)."""
    return name.lower().replace("_", "-").startswith(EGRESS_HEADER_PREFIX)


def http_head(method: str, target: str, fields: Fields, *, multiplexed: bool = False) -> HttpHead:
    """What the request step reads from a request head, in one pass over the header fields.
    ``multiplexed``: HTTP/2 or HTTP/3, where a request without a length may still have a body."""
    found: dict[bytes, list[bytes]] = {}
    handshake = False
    for name, value in fields:
        key = name.lower()
        if b"_" in key and key.replace(b"_", b"-") in _OVERRIDE_NAMES:
            # CGI, Rack and Puma map ``X_HTTP_Method_Override`` to the same variable as the dashed
            # spelling (HTTP_X_HTTP_METHOD_OVERRIDE): an override either way.
            key = key.replace(b"_", b"-")
        if key in _HEAD_FIELDS:
            found.setdefault(key, []).append(value)
        elif key[:4] in _SEC and websocket_field(key):
            handshake = True

    def first(key: bytes) -> str | None:
        values = found.get(key)
        return values[0].decode("latin-1") if values else None

    types = found.get(b"content-type")
    # Several Content-Type fields: servers keep the first, the last or all; every one is judged.
    content_type = b", ".join(types).decode("latin-1") if types else None
    # Several Content-Encoding fields are one list (RFC 9110 5.3): ``identity`` then ``gzip`` is
    # a gzip body to a server that decodes request bodies, not one to read as it stands. A
    # transfer coding other than chunked (``gzip, chunked``: the gate removes only the chunking)
    # is a coding of the body the same way.
    content_encoding = None
    if b"content-encoding" in found or b"transfer-encoding" in found:
        codings = list(found.get(b"content-encoding", ()))
        for value in found.get(b"transfer-encoding", ()):
            codings += [c for c in value.split(b",") if c.strip().lower() != b"chunked"]
        content_encoding = b", ".join(codings).decode("latin-1") if codings else None

    overrides = (
        tuple(v.decode("latin-1") for key in _OVERRIDE_KEYS for v in found.get(key, ()))
        if found
        else ()
    )
    length = first(b"content-length")
    size: int | None
    if b"transfer-encoding" in found:
        size = None  # chunked: known only once read
    elif length is not None:
        # "²" is a digit to isdigit(), and int() refuses more than 4,300 digits: read neither
        size = int(length) if length.isascii() and length.isdigit() and len(length) <= 19 else None
    else:
        size = None if multiplexed else 0  # HTTP/1 without either has no body
    return HttpHead(
        method,
        target,
        overrides,
        first(b"upgrade"),
        size,
        content_type,
        content_encoding,
        handshake=handshake,
    )


def shown_query(query: str, values: bool) -> str:
    """The query as decisions record it: parameter names only unless values are configured. A
    parameter ends at ``;`` as well as ``&``, as the request step reads it (:mod:`proxy.core.paths`),
    so ``?x=1;service=git-receive-pack`` is recorded with both names, and no value hides one."""
    if values:
        return query
    return "".join(
        part if part in "&;" else part.partition("=")[0] + ("=" if "=" in part else "")
        for part in _QUERY_SEPARATOR.split(query)
    )


def http_request(
    kind: Kind,
    host: str,
    port: int | None,
    method: str,
    target: str,
    fields: Fields,
    *,
    query_values: bool,
    multiplexed: bool = False,
    sent: Fields | None = None,
) -> Request:
    """The request the checkpoint decides for a head whose origin-form target is ``target``.
    ``multiplexed``: HTTP/2 or HTTP/3 whose body is still to come (a head that ended its stream
    has none). ``sent``: what the request carries upstream beside ``fields`` (HTTP/2's authority
    and scheme) with them, for an approval's question; the method as sent (its letter case, which
    the approval's method does not keep) goes with them."""
    path, _, query = target.partition("?")
    return Request(
        kind,
        host,
        port,
        method,
        path,
        http=http_head(method, target, fields, multiplexed=multiplexed),
        query=shown_query(query, query_values) if query else None,
        fields=((b":method", method.encode("utf-8", "surrogateescape")), *(sent or fields)),
    )


def plain_problem(
    method: str,
    target: str,
    scheme: str,
    host: str,
    port: int,
    fields: Fields,
    host_headers: Sequence[str],
    named_authority: str | None = None,
) -> Problem | None:
    """Step (2) for a plain (proxied, not tunnelled) request: the head's size caps, then every
    authority it names against the one it is routed to."""
    return head_problem(method, target, fields) or framing_problem(
        scheme, host, port, host_headers, named_authority
    )


__all__ = [
    "EGRESS_HEADER_PREFIX",
    "Fields",
    "http_head",
    "http_request",
    "is_egress_header",
    "plain_problem",
    "shown_query",
]
