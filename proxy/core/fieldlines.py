"""The HTTP/1 field-line grammar the gate's own readers accept (RFC 9110 tokens, RFC 9112 lines).

Narrow on purpose: a name is a token, the colon follows it at once, a value is printable ASCII or tabs,
and every line ends in CRLF (no folding, no obs-text, no bare CR or LF). A head outside it is left to a
stricter or fuller reader, never guessed at. One definition for the request, CONNECT and response
readers."""

from __future__ import annotations

import re

TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
TOKEN_RE = re.compile(TOKEN)
# every field line of a head at once, each ending in CRLF
FIELD_LINES = re.compile(rb"(?:" + TOKEN + rb":[\t\x20-\x7e]*\r\n)*")
# a control character a field value may not hold (any below 0x20 but the tab, and DEL)
CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

__all__ = ["CONTROL_RE", "FIELD_LINES", "TOKEN", "TOKEN_RE"]
