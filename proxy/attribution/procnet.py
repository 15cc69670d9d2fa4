"""Lines of ``/proc/<pid>/net/tcp`` and ``tcp6``: which socket inode has a given 4-tuple.

The kernel prints each address as the raw ``in_addr``/``in6_addr`` in hex, 32-bit word by word in host
byte order (little-endian here), and the port in big-endian hex. The table is the one of the network
namespace of the process whose ``/proc`` directory is read, so reading a sandboxed process's table
shows the sandbox's own sockets, as the sandbox sees them.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from typing import NamedTuple

ESTABLISHED = 0x01


class SocketEntry(NamedTuple):
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    inode: int


def decode_address(text: str) -> tuple[str, int]:
    """``0100007F:0C38`` -> ``("127.0.0.1", 3128)``; 32 hex digits for IPv6. ValueError if malformed."""
    host, _, port = text.partition(":")
    if len(port) != 4 or len(host) not in (8, 32):
        raise ValueError(f"not a /proc/net/tcp address: {text!r}")
    raw = bytes.fromhex(host)
    words = b"".join(
        int.from_bytes(raw[i : i + 4], sys.byteorder).to_bytes(4, "big")
        for i in range(0, len(raw), 4)
    )
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port, 16)


def parse_line(line: str) -> SocketEntry | None:
    """One table line, or None for the header and anything malformed."""
    fields = line.split()
    if len(fields) < 10 or not fields[0].endswith(":"):
        return None
    try:
        return SocketEntry(
            decode_address(fields[1]), decode_address(fields[2]), int(fields[3], 16), int(fields[9])
        )
    except ValueError:
        return None


def encode_address(host: str, port: int) -> str:
    """The inverse of :func:`decode_address`: how the kernel prints ``host:port`` (an IPv4 address
    in a ``tcp6`` table is printed IPv4-mapped)."""
    address = ipaddress.ip_address(host.strip("[]"))
    raw = address.packed
    words = "".join(
        int.from_bytes(raw[i : i + 4], "big").to_bytes(4, sys.byteorder).hex().upper()
        for i in range(0, len(raw), 4)
    )
    return f"{words}:{port:04X}"


def find_inode(lines: Iterable[str], local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the established socket whose local end is ``local`` and remote end ``remote``
    (the client's socket: local is the peer the gate accepted, remote the gate's listener). None
    when there is none, or when the inode is 0 (a socket already closed by its owner).

    Lines are matched on the kernel's own spelling of the 4-tuple and state (a string search, so a
    table of thousands of sockets costs one pass in C), then parsed in full to confirm."""
    want_local = (_canonical(local[0]), local[1])
    want_remote = (_canonical(remote[0]), remote[1])
    needles = {
        f" {encode_address(*want_local)} {encode_address(*want_remote)} {ESTABLISHED:02X} ",
        f" {_mapped(want_local)} {_mapped(want_remote)} {ESTABLISHED:02X} ",
    }
    for line in lines:
        if not any(needle in line for needle in needles):
            continue
        entry = parse_line(line)
        if entry is None or entry.state != ESTABLISHED:
            continue
        if entry.local == want_local and entry.remote == want_remote:
            return entry.inode or None
    return None


def _mapped(end: tuple[str, int]) -> str:
    address = ipaddress.ip_address(end[0])
    if isinstance(address, ipaddress.IPv4Address):
        return encode_address(f"::ffff:{address}", end[1])
    return encode_address(*end)


def _canonical(host: str) -> str:
    address = ipaddress.ip_address(host.strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
