"""Which destination addresses are internal, and which of those the policy opened on purpose.

An allowlisted name must never become a way into the gate host's own network or a cloud metadata
service, whatever the name resolves to or however the address is written. IPv6 forms that carry an
IPv4 address (mapped, compatible, SIIT, NAT64, 6to4, Teredo) are judged by the IPv4 address they
reach, because a translator or relay on the path will deliver the packets there.

Tables are built once at import and looked up by prefix length with integer shifts, so a check costs
a dozen dict lookups and no object allocation. Documentation ranges (192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24, 2001:db8::/32) are deliberately absent: tests and examples use them as "public".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

__all__ = ["check_address", "internal_range", "is_allowed_internal"]

# Most specific first only for readability: lookup is longest-prefix-wins regardless of order.
_V4_RANGES: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "metadata 169.254.169.254"),
    ("255.255.255.255/32", "broadcast 255.255.255.255"),
    ("192.0.0.0/24", "ietf-protocol-assignments 192.0.0.0/24"),
    ("169.254.0.0/16", "link-local 169.254.0.0/16"),
    ("192.168.0.0/16", "rfc1918 192.168.0.0/16"),
    ("198.18.0.0/15", "benchmarking 198.18.0.0/15"),
    ("172.16.0.0/12", "rfc1918 172.16.0.0/12"),
    ("100.64.0.0/10", "cgnat 100.64.0.0/10"),
    ("0.0.0.0/8", "this-network 0.0.0.0/8"),
    ("10.0.0.0/8", "rfc1918 10.0.0.0/8"),
    ("127.0.0.0/8", "loopback 127.0.0.0/8"),
    ("224.0.0.0/4", "multicast 224.0.0.0/4"),
    ("240.0.0.0/4", "reserved 240.0.0.0/4"),
)

_V6_RANGES: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified ::"),
    ("::1/128", "ipv6 loopback ::1"),
    ("fd00:ec2::254/128", "aws-metadata fd00:ec2::254"),
    ("100::/64", "discard-only 100::/64"),
    ("fe80::/10", "link-local fe80::/10"),
    ("fec0::/10", "site-local fec0::/10"),
    ("fc00::/7", "ula fc00::/7"),
    ("ff00::/8", "ipv6 multicast ff00::/8"),
)

_V4_ALL = 0xFFFFFFFF


def _table(
    ranges: tuple[tuple[str, str], ...], bits: int
) -> tuple[tuple[int, dict[int, str]], ...]:
    """Group ranges as (shift, {network >> shift: name}), longest prefix first."""
    by_len: dict[int, dict[int, str]] = {}
    for cidr, name in ranges:
        net = IPv4Network(cidr) if bits == 32 else IPv6Network(cidr)
        shift = bits - net.prefixlen
        by_len.setdefault(shift, {})[int(net.network_address) >> shift] = name
    return tuple(sorted(by_len.items()))


_V4_TABLE = _table(_V4_RANGES, 32)
_V6_TABLE = _table(_V6_RANGES, 128)


def _lookup(table: tuple[tuple[int, dict[int, str]], ...], value: int) -> str | None:
    for shift, nets in table:
        name = nets.get(value >> shift)
        if name is not None:
            return name
    return None


def _v4_at(value: int, shift: int) -> int:
    return (value >> shift) & _V4_ALL


def _last32(value: int) -> Iterator[int]:
    yield value & _V4_ALL


def _sixtofour(value: int) -> Iterator[int]:
    yield _v4_at(value, 80)  # 2002:AABB:CCDD::/48, bits 16..48


def _teredo(value: int) -> Iterator[int]:
    yield (value & _V4_ALL) ^ _V4_ALL  # client (obfuscated); the relay delivers packets here
    yield _v4_at(value, 64)  # server, bits 32..64


_Extract = Callable[[int], Iterator[int]]


def _embed(cidr: str, label: str, extract: _Extract) -> tuple[int, int, str, _Extract]:
    net = IPv6Network(cidr)
    return int(net.network_address), int(net.netmask), label, extract


# RFC 8215 local-use NAT64: the site picks the RFC 6052 prefix length, so where the IPv4 address sits
# cannot be known here. The range is not globally reachable; it is internal as a whole (named by the
# /96 reading when that one is internal too) and a site that uses it opens it with allow_internal.
_NAT64_LOCAL = _embed("64:ff9b:1::/48", "nat64-local", _last32)
_NAT64_LOCAL_NAME = "nat64-local 64:ff9b:1::/48"

# Checked only after _V6_TABLE, so ::/128 and ::1 keep their own names rather than "ipv4-compatible".
_V6_EMBEDDED: tuple[tuple[int, int, str, _Extract], ...] = (
    _embed("::ffff:0:0/96", "ipv4-mapped", _last32),
    _embed("::/96", "ipv4-compatible", _last32),
    _embed("::ffff:0:0:0/96", "ipv4-translated", _last32),
    _embed("64:ff9b::/96", "nat64", _last32),
    _embed("2002::/16", "6to4", _sixtofour),
    _embed("2001::/32", "teredo", _teredo),
)


def _v4_range(value: int) -> str | None:
    return _lookup(_V4_TABLE, value)


def internal_range(ip: IPv4Address | IPv6Address) -> str | None:
    """Name the internal range ``ip`` is in (e.g. "nat64(loopback 127.0.0.0/8)"), None if public."""
    if isinstance(ip, IPv4Address):
        return _v4_range(int(ip))
    if not isinstance(ip, IPv6Address):
        raise TypeError(f"not an IP address: {ip!r}")
    value = int(ip)
    name = _lookup(_V6_TABLE, value)
    if name is not None:
        return name
    for net, mask, label, extract in _V6_EMBEDDED:
        if value & mask == net:
            for v4 in extract(value):
                inner = _v4_range(v4)
                if inner is not None:
                    return f"{label}({inner})"
            return None
    net, mask, label, _ = _NAT64_LOCAL
    if value & mask == net:
        inner = _v4_range(value & _V4_ALL)
        return f"{label}({inner})" if inner is not None else _NAT64_LOCAL_NAME
    return None


def is_allowed_internal(
    ip: IPv4Address | IPv6Address, allow_internal: Sequence[IPv4Network | IPv6Network]
) -> bool:
    """True when the policy explicitly opened a range containing ``ip``.

    An IPv4-mapped address is the same socket destination as its IPv4 address, so it is also
    checked as IPv4. Other embeddings (NAT64, 6to4, Teredo) go through a translator or relay and
    are opened only by a range containing the IPv6 address itself.
    """
    if any(ip in net for net in allow_internal):
        return True
    if isinstance(ip, IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return any(mapped in net for net in allow_internal)
    return False


def check_address(
    ip: IPv4Address | IPv6Address, allow_internal: Sequence[IPv4Network | IPv6Network]
) -> str | None:
    """None if ``ip`` may be connected to, else the name of the internal range that forbids it."""
    name = internal_range(ip)
    if name is None or is_allowed_internal(ip, allow_internal):
        return None
    return name
