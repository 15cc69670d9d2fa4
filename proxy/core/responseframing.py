"""Where an upstream's response ends, for the plainest and commonest response heads.

The plain-HTTP front end relays each response to a request it sent upstream and must find its end
exactly: a guessed boundary would let an upstream answer the client's next request. h11 reads every
shape of HTTP/1 response, but most responses are a head and a body of a stated ``Content-Length``
(or no body at all), and for those h11's event machinery was most of the front end's own cost per
request. Such a body needs no parser: its bytes are counted through.

:func:`read_response_head` takes a head only when h11 would accept it and frame it the same way,
and only in its plainest spelling: ``HTTP/1.0`` or ``HTTP/1.1``, a final status (200-599) with a
reason phrase, printable ASCII fields, at most one ``Content-Length`` of plain digits, no
``Transfer-Encoding``, and a length unless the response has no body (a response to ``HEAD``, a
``204``, a ``304``). Everything else (an informational response, a chunked body or one delimited by
the close, obs-text, a bad or repeated length, ...) is None: h11's to read, as before. Pure: the
caller has checked the raw head for what h11 leaves out (bare CR or LF, folding, NUL, two lengths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.core.fieldlines import FIELD_LINES, TOKEN
from proxy.core.frozen import fast_init

_STATUS = re.compile(rb"HTTP/1\.[01] [2-5][0-9][0-9] [\t\x20-\x7e]*")
# the same fields, each spelled as h11 re-serialises it ("name: value") but for trailing padding
_PLAIN_FIELDS = re.compile(rb"(?:" + TOKEN + rb": [!-~][\t -~]*\r\n)*")
_LENGTH = re.compile(rb"[0-9]{1,20}")  # h11 refuses more digits
_NO_BODY = frozenset({204, 304})


@fast_init
@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A final response head and the framing of what follows it."""

    head: bytes  # for the client: as h11 would re-serialise it (values without their padding)
    size: int  # bytes of the head upstream, up to and including the blank line
    length: int  # bytes of body that follow it (0 for a response without a body)
    announced: int  # its Content-Length (0 without one), as the connection's byte count takes it
    closes: bool  # the client connection closes after it, as mitmproxy decides
    keep_alive: bool  # the upstream may answer another request on its connection, as h11 decides


def read_response_head(data: bytes, end: int, method: str) -> ResponseHead | None:
    """The response head at the start of ``data`` (``end``: where its ``\\r\\n\\r\\n`` begins) to a
    ``method`` request, or None when it is h11's to read."""
    line_end = data.find(b"\r\n")
    if not _STATUS.fullmatch(data, 0, line_end):
        return None
    plain = (
        _PLAIN_FIELDS.fullmatch(data, line_end + 2, end + 2) is not None
        and data.find(b" \r\n", line_end + 2, end + 2) < 0
        and data.find(b"\t\r\n", line_end + 2, end + 2) < 0
    )
    if not plain and not FIELD_LINES.fullmatch(data, line_end + 2, end + 2):
        return None
    # Every line is "token:value" now, so a field is found by its name after a line end.
    block = data[line_end : end + 2].lower()  # from the status line's CRLF
    if b"\r\ntransfer-encoding:" in block:
        return None
    length: int | None = None
    at = block.find(b"\r\ncontent-length:")
    if at >= 0:
        if block.find(b"\r\ncontent-length:", at + 2) >= 0:
            return None
        value = block[at + 17 : block.index(b"\r\n", at + 2)].strip(b" \t")
        if not _LENGTH.fullmatch(value):
            return None
        length = int(value)
    tokens: set[bytes] = set()
    at = block.find(b"\r\nconnection:")
    while at >= 0:
        value = block[at + 13 : block.index(b"\r\n", at + 2)]
        tokens.update(map(bytes.strip, value.split(b",")))
        at = block.find(b"\r\nconnection:", at + 2)
    status = int(data[9:12])
    bodied = method != "HEAD" and status not in _NO_BODY
    if bodied and length is None:
        return None  # delimited by the close
    version_11 = data[7] == 0x31  # b"1" of "HTTP/1.1"
    if b"close" in tokens:
        closes = True
    elif b"keep-alive" in tokens:
        closes = False
    else:
        closes = not version_11
    return ResponseHead(
        data[: end + 4] if plain else _plain(data, line_end, end),
        end + 4,
        (length or 0) if bodied else 0,
        length or 0,
        closes,
        version_11 and b"close" not in tokens,
    )


def _plain(data: bytes, line_end: int, end: int) -> bytes:
    """The head with each field as ``name: value``, its padding dropped (as h11 reads it)."""
    lines = [data[:line_end]]
    for line in data[line_end + 2 : end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        lines.append(name + b": " + value.strip(b" \t"))
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


__all__ = ["ResponseHead", "read_response_head"]
