"""What the first bytes inside an allowed CONNECT tunnel are, decided before a byte is relayed.

A tunnel is allowed for one host and port; its contents must not be a way to another host (threats 5
and 6). So the first bytes must be, by port:

- 80: HTTP (each request's Host is then checked by the HTTP layer);
- 22: an SSH identification string (git over ssh);
- anything else: one TLS ClientHello, whose server name is then checked against the CONNECT host.

Sans-IO: :func:`classify` takes the bytes buffered so far and says *wait* (not enough yet), *refuse*
(with a reason) or what the protocol is. It never raises. Everything that can be refused from a prefix
is refused from that prefix: a record or handshake header that announces more than the caps is refused at
once instead of waiting for bytes that would only be buffered. The ClientHello parser is written here,
not borrowed, so that these bounds are checked on the headers and the core stays free of mitmproxy.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.core.decision import Reason

SSH_PORT = 22
PLAIN_HTTP_PORT = 80
MAX_CLIENT_HELLO = 64 * 1024  # a handshake message announcing more is not a real client's hello
MAX_RECORD = 16 * 1024  # TLSPlaintext.length must not exceed 2^14 (RFC 8446 5.1)
MAX_HELLO_RECORDS = 32  # real clients use one or two; more is fragmentation to evade or to stall
ECH_EXTENSION = 0xFE0D  # encrypted_client_hello: hides the real server name from the gate
SNI_EXTENSION = 0x0000
ALPN_EXTENSION = 0x0010
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01


Bytes = bytes | bytearray | memoryview  # a buffer classify reads in place


class Protocol(StrEnum):
    WAIT = "wait"  # not enough bytes yet
    REFUSE = "refuse"
    TLS = "tls"
    SSH = "ssh"
    HTTP = "http"


@dataclass(frozen=True, slots=True)
class FirstBytes:
    protocol: Protocol
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    reason: Reason | None = None  # set when protocol is REFUSE
    detail: str = ""
    # TLS: the bytes of the records that carried the ClientHello (what follows them is not part of
    # it: held until the server has answered, see proxy.core.helloretry)
    size: int = field(default=0, compare=False)


WAIT = FirstBytes(Protocol.WAIT)
SSH = FirstBytes(Protocol.SSH)
HTTP = FirstBytes(Protocol.HTTP)


def _refuse(detail: str, reason: Reason = Reason.NOT_TLS) -> FirstBytes:
    return FirstBytes(Protocol.REFUSE, reason=reason, detail=detail)


def classify(port: int | None, data: Bytes, start: int = 0) -> FirstBytes:
    """Classify a tunnel's first bytes (``data`` from ``start``) for a tunnel to ``port``.

    A client may send its hello a byte at a time: until the records it announced are complete,
    this walks only their headers (at most MAX_HELLO_RECORDS) and copies nothing of the buffer, so
    waiting costs the same whatever has been buffered, and the hello is assembled and parsed once."""
    if len(data) <= start:
        return WAIT
    if port == PLAIN_HTTP_PORT:
        return HTTP
    if port == SSH_PORT:
        head = bytes(data[start : start + 4])
        if head == b"SSH-":
            return SSH
        if len(head) < 4 and b"SSH-".startswith(head):
            return WAIT
        return _refuse("port 22 tunnels must carry SSH")
    return _client_hello(port, data, start)


_EXTENSION_HEADER = struct.Struct(">HH")  # extension type, value length
_PRINTABLE = re.compile(rb"[\x21-\x7e]*")


class _Malformed(Exception):
    pass


def _client_hello(port: int | None, data: Bytes, start: int) -> FirstBytes:
    if data[start] != _HANDSHAKE:
        return _refuse(f"the tunnel to port {port} must start with TLS")
    spans: list[tuple[int, int]] = []  # (offset, bytes present) of each record's payload
    header = b""  # the handshake message's first 4 bytes, once they are here
    have = 0  # handshake bytes buffered so far
    announced = 0  # handshake bytes the records' headers announce (present or still to come)
    offset = start
    needed: int | None = None  # total handshake bytes, once its header is known
    while True:
        if len(data) - offset < 5:
            return _partial_record(port, bytes(data[offset:]))
        if data[offset] != _HANDSHAKE or data[offset + 1] != 0x03:
            return _refuse("malformed TLS ClientHello: not a handshake record")
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if length == 0 or length > MAX_RECORD:
            return _refuse(f"malformed TLS ClientHello: record length {length}")
        if len(spans) >= MAX_HELLO_RECORDS:
            return _refuse(f"TLS ClientHello split over more than {MAX_HELLO_RECORDS} records")
        present = min(length, len(data) - offset - 5)
        spans.append((offset + 5, present))
        if len(header) < 4:
            header += bytes(data[offset + 5 : offset + 5 + min(present, 4 - len(header))])
        have += present
        announced += length
        offset += 5 + length
        if needed is None and len(header) >= 4:
            if header[0] != _CLIENT_HELLO:
                return _refuse("the first TLS handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(header[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                return _refuse(f"oversized TLS ClientHello ({needed} bytes announced)")
        if needed is not None and announced > needed:
            # Another handshake message in the ClientHello's record (a second ClientHello the
            # server would read after asking for one): no client sends anything there. Decided
            # from the record's header, not from the bytes present: a record whose tail has not
            # come yet would otherwise pass with the hello alone, and its tail go on as part of it.
            return _refuse("malformed TLS ClientHello: more handshake bytes in its record")
        if needed is not None and have >= needed:
            if len(spans) == 1:  # one record (every real client): the body is one slice
                at = spans[0][0]
                body = bytes(data[at + 4 : at + needed])
            else:
                body = b"".join(bytes(data[at : at + size]) for at, size in spans)[4:needed]
            try:
                return _parse_hello(body, offset - start)
            except _Malformed as exc:
                return _refuse(f"malformed TLS ClientHello: {exc}")
        if offset >= len(data):
            return WAIT


def _partial_record(port: int | None, head: bytes) -> FirstBytes:
    """Only part of a record header has arrived: refuse as soon as it cannot be TLS."""
    if len(head) >= 2 and head[1] != 0x03:
        return _refuse(f"the tunnel to port {port} must start with TLS")
    if head and head[0] != _HANDSHAKE:
        return _refuse("malformed TLS ClientHello: not a handshake record")
    if len(head) >= 5:
        length = int.from_bytes(head[3:5], "big")
        if length > MAX_RECORD:
            return _refuse(f"malformed TLS ClientHello: record length {length}")
    return WAIT


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, size: int) -> bytes:
        return self.take(self.number(size))

    def done(self) -> bool:
        return self.pos == len(self.data)


def _parse_hello(body: bytes, size: int) -> FirstBytes:
    """The ClientHello's body (after its 4-byte header), carried by ``size`` bytes of records.

    Read with plain offsets, each length bounds-checked before it is used: it runs once per tunnel,
    between the ClientHello and the upstream connect (a reader object per field cost ~20 µs)."""
    end = len(body)
    pos = 2 + 32  # legacy_version, random
    if pos + 1 > end or pos + 1 + body[pos] > end:
        raise _Malformed("truncated")
    if body[pos] > 32:
        raise _Malformed("session id longer than 32 bytes")
    pos += 1 + body[pos]
    if pos + 2 > end:
        raise _Malformed("truncated")
    suites = int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    if pos + suites > end:
        raise _Malformed("truncated")
    if not suites or suites % 2:
        raise _Malformed("bad cipher suite list")
    pos += suites
    if pos + 1 > end or pos + 1 + body[pos] > end:
        raise _Malformed("truncated")
    if not body[pos]:
        raise _Malformed("no compression methods")
    pos += 1 + body[pos]
    if pos == end:
        return FirstBytes(Protocol.TLS, size=size)  # no extensions at all: no server name
    if pos + 2 > end:
        raise _Malformed("truncated")
    length = int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    if pos + length > end:
        raise _Malformed("truncated")
    if pos + length != end:
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[bytes, ...] = ()
    while pos < end:
        if pos + 4 > end:
            raise _Malformed("truncated")
        kind, length = _EXTENSION_HEADER.unpack_from(body, pos)
        pos += 4
        if pos + length > end:
            raise _Malformed("truncated")
        value = body[pos : pos + length]
        pos += length
        if kind in seen:
            raise _Malformed(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == ECH_EXTENSION:
            return _refuse(
                "Encrypted Client Hello hides the destination; disable ECH for this client",
                Reason.ECH_REFUSED,
            )
        if kind == SNI_EXTENSION:
            sni = _server_name(value)
        elif kind == ALPN_EXTENSION:
            alpn = _alpn(value)
    return FirstBytes(Protocol.TLS, sni=sni, alpn=alpn, size=size)


def _inner_list(value: bytes) -> _Reader:
    """An extension whose whole value is one length-prefixed list (nothing may follow it)."""
    outer = _Reader(value)
    inner = _Reader(outer.vector(2))
    if not outer.done():
        raise _Malformed("bytes after an extension's list")
    return inner


def _server_name(value: bytes) -> str | None:
    names = _inner_list(value)
    found: str | None = None
    while not names.done():
        kind = names.number(1)
        name = names.vector(2)
        if kind != 0:
            continue  # only host_name (0) is defined; others carry nothing the gate routes on
        if found is not None:
            raise _Malformed("more than one server name")
        if not _PRINTABLE.fullmatch(name):
            raise _Malformed("server name is not printable ASCII")
        found = name.decode("ascii")
    return found or None


def _alpn(value: bytes) -> tuple[bytes, ...]:
    names = _inner_list(value)
    out: list[bytes] = []
    while not names.done():
        out.append(names.vector(1))
    return tuple(out)


__all__ = ["HTTP", "MAX_CLIENT_HELLO", "SSH", "WAIT", "FirstBytes", "Protocol", "classify"]
