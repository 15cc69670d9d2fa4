"""A second ClientHello, sent after the server asked for one, is decided as the first one was.

A TLS 1.3 server that cannot use the client's key shares answers the first ClientHello with a
HelloRetryRequest, and the client sends a second ClientHello. The gate decides a tunnel's server name
from its first ClientHello (:mod:`proxy.core.firstbytes`); a client that forces the retry (it offers
no usable key share) could name the allowed host first and another host in the second one, which a
server that routes by name then serves (threat 5). So the client's bytes after its first ClientHello
are held until the server's first handshake message shows whether it asks again: if it does, what the
client sends next must be a second ClientHello, classified like the first and decided by the
checkpoint; otherwise the held bytes go on. Holding them is what defeats a client that sends both
hellos at once.

Sans-IO and pure, for both adapters that relay tunnels (the front end and mitmproxy's TCP layer).
"""

from __future__ import annotations

from proxy.core.decision import Reason
from proxy.core.firstbytes import MAX_HELLO_RECORDS, WAIT, FirstBytes, Protocol, classify

# ServerHello.random of a HelloRetryRequest: SHA-256 of "HelloRetryRequest" (RFC 8446 4.1.3)
RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_HANDSHAKE = 0x16
_CHANGE_CIPHER_SPEC = b"\x14\x03\x03\x00\x01\x01"  # middlebox compatibility (RFC 8446 D.4)
_SERVER_HELLO = 0x02
_NEEDED = 4 + 2 + 32  # handshake header, legacy_version, random
MAX_SERVER_PREFIX = 64 * 1024  # a server reply read this far without an answer is not a hello


def asks_again(data: bytes) -> bool | None:
    """Whether a server's first bytes in a tunnel are a HelloRetryRequest; None: not known yet.
    Anything but a ServerHello first (an alert, another protocol) is not one."""
    handshake = b""
    offset = 0
    for _ in range(MAX_HELLO_RECORDS):
        if len(data) - offset < 5:
            return None if len(data) < MAX_SERVER_PREFIX else False
        if data[offset] != _HANDSHAKE:
            return False
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        handshake += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if handshake and handshake[0] != _SERVER_HELLO:
            return False
        if len(handshake) >= _NEEDED:
            return handshake[6:_NEEDED] == RETRY_RANDOM
        if offset > len(data):
            return None
    return False


def second_hello(port: int | None, data: bytes | bytearray) -> FirstBytes:
    """The client's bytes after a HelloRetryRequest: one ChangeCipherSpec record skipped (a
    client sends at most one, RFC 8446 D.4), then a second ClientHello, classified as the first one
    was (its ``size`` counts the skipped record)."""
    if len(data) < len(_CHANGE_CIPHER_SPEC) and _CHANGE_CIPHER_SPEC.startswith(data):
        return WAIT  # nothing yet, or part of the ChangeCipherSpec
    skipped = len(_CHANGE_CIPHER_SPEC) if data.startswith(_CHANGE_CIPHER_SPEC) else 0
    second = classify(port, data, skipped)  # read in place: waiting copies nothing
    if second.protocol is Protocol.TLS:
        return FirstBytes(Protocol.TLS, second.sni, second.alpn, size=skipped + second.size)
    if second.protocol in (Protocol.WAIT, Protocol.REFUSE):
        return second
    return FirstBytes(
        Protocol.REFUSE,
        reason=Reason.NOT_TLS,
        detail="the server asked for a second TLS ClientHello and the client sent something else",
    )


__all__ = ["MAX_SERVER_PREFIX", "RETRY_RANDOM", "asks_again", "second_hello"]
