"""The HTTP/1 field-line grammar the gate's own readers accept (RFC 9110 tokens, RFC 9112 lines).

Narrow on purpose: a name is a token, the colon follows it at once, a value is printable ASCII or tabs,
and every line ends in CRLF (no folding, no obs-text, no bare CR or LF). A head outside it is left to a
stricter or fuller reader, never guessed at. One definition for the request, CONNECT and response
readers, for the request step's method overrides and for every request's method."""

from __future__ import annotations

import re

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TOKEN_RE = re.compile(TOKEN)
_TOKEN_TEXT = re.compile(TOKEN.decode("ascii"))
# every field line of a head at once, each ending in CRLF
FIELD_LINES = re.compile(rb"(?:" + TOKEN + rb":[\t\x20-\x7e]*\r\n)*")
# a control character a field value may not hold (any below 0x20 but the tab, and DEL)
CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_WEBSOCKET_PREFIX = b"sec-websocket-"


def is_token(text: str) -> bool:
    """``text`` is an RFC 9110 token (1*tchar), as a method must be: anything else (a space, a
    control byte, non-ASCII) is written into the upstream's request line where a server may read
    it as part of the target, or not at all."""
    return _TOKEN_TEXT.fullmatch(text) is not None


def websocket_field(name: bytes) -> bool:
    """A WebSocket handshake field (``Sec-WebSocket-*``; the ``_`` spelling, which CGI-style servers
    read as the same): mitmproxy, and servers, switch to WebSocket on these even without an
    ``Upgrade`` field, so a request carrying one asks for an upgrade."""
    return name[: len(_WEBSOCKET_PREFIX)].lower().replace(b"_", b"-") == _WEBSOCKET_PREFIX


__all__ = ["CONTROL_RE", "FIELD_LINES", "TOKEN", "TOKEN_RE", "is_token", "websocket_field"]
