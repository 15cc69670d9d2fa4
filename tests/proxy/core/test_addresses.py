"""Internal-address classification against threats.md classes 2 and 3.

Addresses here are values only: nothing in this module opens a socket.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

import pytest

from proxy.core.addresses import check_address, internal_range, is_allowed_internal
from proxy.core.hosts import canonical_host

LOOP = "loopback 127.0.0.0/8"
META = "metadata 169.254.169.254"
R10 = "rfc1918 10.0.0.0/8"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        # this network
        ("0.0.0.0", "this-network 0.0.0.0/8"),
        ("0.255.255.255", "this-network 0.0.0.0/8"),
        ("1.0.0.0", None),
        # RFC 1918, with both edges and the first address outside
        ("9.255.255.255", None),
        ("10.0.0.0", R10),
        ("10.0.0.1", R10),
        ("10.255.255.255", R10),
        ("11.0.0.0", None),
        ("172.15.255.255", None),
        ("172.16.0.0", "rfc1918 172.16.0.0/12"),
        ("172.31.255.255", "rfc1918 172.16.0.0/12"),
        ("172.32.0.0", None),
        ("192.167.255.255", None),
        ("192.168.0.1", "rfc1918 192.168.0.0/16"),
        ("192.168.255.255", "rfc1918 192.168.0.0/16"),
        ("192.169.0.0", None),
        # CGNAT (Alibaba's metadata 100.100.100.200 lives here)
        ("100.63.255.255", None),
        ("100.64.0.0", "cgnat 100.64.0.0/10"),
        ("100.100.100.200", "cgnat 100.64.0.0/10"),
        ("100.127.255.255", "cgnat 100.64.0.0/10"),
        ("100.128.0.0", None),
        # loopback
        ("126.255.255.255", None),
        ("127.0.0.1", LOOP),
        ("127.255.255.254", LOOP),
        ("128.0.0.0", None),
        # link-local and the cloud metadata address
        ("169.254.169.254", META),
        ("169.254.169.253", "link-local 169.254.0.0/16"),
        ("169.254.170.2", "link-local 169.254.0.0/16"),
        ("169.254.0.0", "link-local 169.254.0.0/16"),
        ("169.253.255.255", None),
        ("169.255.0.0", None),
        # IETF protocol assignments
        ("192.0.0.0", "ietf-protocol-assignments 192.0.0.0/24"),
        ("192.0.0.170", "ietf-protocol-assignments 192.0.0.0/24"),
        ("192.0.1.0", None),
        # benchmarking
        ("198.17.255.255", None),
        ("198.18.0.0", "benchmarking 198.18.0.0/15"),
        ("198.19.255.255", "benchmarking 198.18.0.0/15"),
        ("198.20.0.0", None),
        # multicast, reserved, broadcast
        ("223.255.255.255", None),
        ("224.0.0.1", "multicast 224.0.0.0/4"),
        ("239.255.255.255", "multicast 224.0.0.0/4"),
        ("240.0.0.0", "reserved 240.0.0.0/4"),
        ("255.255.255.254", "reserved 240.0.0.0/4"),
        ("255.255.255.255", "broadcast 255.255.255.255"),
        # documentation ranges are NOT internal
        ("192.0.2.1", None),
        ("198.51.100.7", None),
        ("203.0.113.9", None),
        # public (values only)
        ("1.1.1.1", None),
        ("8.8.8.8", None),
        ("151.101.0.223", None),
    ],
)
def test_ipv4_ranges(addr: str, expected: str | None) -> None:
    assert internal_range(IPv4Address(addr)) == expected


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("::", "unspecified ::"),
        ("::1", "ipv6 loopback ::1"),
        ("fe80::1", "link-local fe80::/10"),
        ("febf:ffff::1", "link-local fe80::/10"),
        ("fec0::1", "site-local fec0::/10"),
        ("feff::1", "site-local fec0::/10"),
        ("fc00::1", "ula fc00::/7"),
        ("fdff:ffff::1", "ula fc00::/7"),
        ("fbff:ffff::1", None),
        ("fd00:ec2::254", "aws-metadata fd00:ec2::254"),
        ("fd00:ec2::253", "ula fc00::/7"),
        ("ff02::1", "ipv6 multicast ff00::/8"),
        ("ff0e::1", "ipv6 multicast ff00::/8"),
        ("100::1", "discard-only 100::/64"),
        ("100:0:0:1::1", None),
        # documentation and public
        ("2001:db8::1", None),
        ("2606:4700:4700::1111", None),
        ("2a00:1450:4001::1", None),
    ],
)
def test_ipv6_ranges(addr: str, expected: str | None) -> None:
    assert internal_range(IPv6Address(addr)) == expected


# IPv6 spellings that deliver to an embedded IPv4 address: (form, address, expected label).
EMBEDDED = [
    # IPv4-mapped ::ffff:0:0/96
    ("::ffff:127.0.0.1", "ipv4-mapped", LOOP),
    ("::ffff:a9fe:a9fe", "ipv4-mapped", META),
    ("::ffff:10.0.0.1", "ipv4-mapped", R10),
    # IPv4-compatible ::/96 (deprecated, still routed by some stacks)
    ("::127.0.0.1", "ipv4-compatible", LOOP),
    ("::169.254.169.254", "ipv4-compatible", META),
    ("::10.0.0.1", "ipv4-compatible", R10),
    ("::2", "ipv4-compatible", "this-network 0.0.0.0/8"),
    # SIIT IPv4-translated ::ffff:0:0:0/96
    ("::ffff:0:127.0.0.1", "ipv4-translated", LOOP),
    ("::ffff:0:169.254.169.254", "ipv4-translated", META),
    # NAT64 well-known prefix
    ("64:ff9b::127.0.0.1", "nat64", LOOP),
    ("64:ff9b::a9fe:a9fe", "nat64", META),
    ("64:ff9b::10.0.0.1", "nat64", R10),
    # local-use NAT64 64:ff9b:1::/48
    ("64:ff9b:1::7f00:1", "nat64-local", LOOP),
    ("64:ff9b:1::169.254.169.254", "nat64-local", META),
    # 6to4: 2002:AABB:CCDD::/48
    ("2002:7f00:1::", "6to4", LOOP),
    ("2002:a9fe:a9fe::1", "6to4", META),
    ("2002:a00:1:1::1", "6to4", R10),
    # Teredo client: last 32 bits are the client IPv4 XOR 0xffffffff (server 65.54.227.120 public)
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "teredo", LOOP),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "teredo", META),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "teredo", R10),
    # Teredo server in bits 32..64 (client 192.0.2.45, documentation, public)
    ("2001:0:a00:1:8000:63bf:3fff:fdd2", "teredo", R10),
    ("2001:0:a9fe:a9fe:8000:63bf:3fff:fdd2", "teredo", META),
]


@pytest.mark.parametrize(("addr", "form", "inner"), EMBEDDED)
def test_embedded_ipv4_is_classified(addr: str, form: str, inner: str) -> None:
    assert internal_range(IPv6Address(addr)) == f"{form}({inner})"


@pytest.mark.parametrize(
    "addr",
    [
        "::ffff:1.1.1.1",
        "64:ff9b::1.1.1.1",
        "64:ff9b::192.0.2.1",  # documentation stays allowed through NAT64
        "2002:101:101::1",
        "2002:cb00:7101::",  # 6to4 of 203.0.113.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo server and client public
    ],
)
def test_embedded_public_ipv4_is_not_internal(addr: str) -> None:
    assert internal_range(IPv6Address(addr)) is None


def test_nat64_local_is_internal_even_with_public_embedding() -> None:
    """The site picks the prefix length, so where the IPv4 sits is unknown: the /48 is internal."""
    assert internal_range(IPv6Address("64:ff9b:1::101:101")) == "nat64-local 64:ff9b:1::/48"


def _v4_sample() -> list[IPv4Address]:
    step = 262_139  # prime stride over the whole space, plus the edges of every special range
    edges = [
        "0.0.0.0 10.0.0.0 100.64.0.0 127.0.0.0 169.254.0.0 172.16.0.0 192.0.0.0 192.168.0.0",
        "198.18.0.0 224.0.0.0 240.0.0.0 255.255.255.255 192.0.2.0 198.51.100.0 203.0.113.0",
    ]
    extra = [IPv4Address(a) for line in edges for a in line.split()]
    near = [IPv4Address(int(a) + d) for a in extra for d in (-1, 0, 1) if 0 <= int(a) + d < 2**32]
    return [IPv4Address(i) for i in range(0, 2**32, step)] + near


DOC = [ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


def test_every_non_global_ipv4_is_internal() -> None:
    """Cross-check against the IANA registry as the standard library encodes it."""
    missed = [
        a
        for a in _v4_sample()
        if (not a.is_global or a.is_multicast)
        and not any(a in d for d in DOC)
        and a not in (IPv4Address("192.0.0.9"), IPv4Address("192.0.0.10"))  # global anycast
        and internal_range(a) is None
    ]
    assert missed == []


def test_documentation_ranges_are_never_internal() -> None:
    for net in DOC:
        for a in (net.network_address, net.broadcast_address, net.network_address + 77):
            assert internal_range(a) is None


def test_embeddings_agree_with_ipv4() -> None:
    """Each embedding must hide nothing: internal inside iff internal as plain IPv4."""
    for a in _v4_sample():
        v = int(a)
        inner = internal_range(a)
        forms = {
            "ipv4-mapped": 0xFFFF << 32 | v,
            "nat64": 0x64FF9B << 96 | v,
            "6to4": 0x2002 << 112 | v << 80,
            "teredo": 0x20010000 << 96 | 0x41_36_E3_78 << 64 | (v ^ 0xFFFFFFFF),
        }
        for form, value in forms.items():
            got = internal_range(IPv6Address(value))
            assert got == (None if inner is None else f"{form}({inner})"), (form, a)


# --- spellings end to end: canonical_host then check_address ---------------------------------------

SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "0x7f.1",
    "127.0.0.1.",
    "[::ffff:127.0.0.1]",
    "::ffff:7f00:1",
    "[::1]",
    "::",
    "0",
    "169.254.169.254",
    "2852039166",
    "0xA9FEA9FE",
    "0251.0376.0251.0376",
    "169.16689662",
    "0xa9.0xfe.0xa9.0xfe.",
    "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b::127.0.0.1]",
    "2002:a9fe:a9fe::",
    "[2002:7f00:1::]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",
    "[2001:0:4136:e378:8000:63bf:5601:5601]",
    "[fe80::1]",
    "fd00:ec2::254",
    "10.1.1",
    "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # fullwidth 127.0.0.1
]


@pytest.mark.parametrize("raw", SPELLINGS)
def test_every_internal_spelling_is_refused(raw: str) -> None:
    ip = canonical_host(raw)
    assert isinstance(ip, IPv4Address | IPv6Address)
    assert check_address(ip, ()) is not None


# --- allow_internal ------------------------------------------------------------------------------

Nets = list[IPv4Network | IPv6Network]


def _nets(*cidrs: str) -> Nets:
    return [ip_network(c) for c in cidrs]


@pytest.mark.parametrize(
    ("addr", "opened", "expected"),
    [
        ("127.0.0.1", [], LOOP),
        ("127.0.0.1", ["127.0.0.0/8"], None),
        ("127.0.0.2", ["127.0.0.1/32"], LOOP),
        ("127.0.0.1", ["10.0.0.0/8"], LOOP),
        ("169.254.169.254", ["127.0.0.0/8"], META),
        ("169.254.169.254", ["169.254.169.254/32"], None),
        ("10.1.2.3", ["10.1.0.0/16"], None),
        ("10.2.0.1", ["10.1.0.0/16"], R10),
        # an IPv4-mapped address is the same socket destination as its IPv4 address
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], None),
        # but NAT64/6to4 go through a translator: only a range containing the IPv6 address opens them
        ("64:ff9b::7f00:1", ["127.0.0.0/8"], f"nat64({LOOP})"),
        ("64:ff9b::7f00:1", ["64:ff9b::/96"], None),
        ("2002:7f00:1::", ["127.0.0.0/8"], f"6to4({LOOP})"),
        # IPv6 loopback is not opened by IPv4 loopback, nor the other way round
        ("::1", ["127.0.0.0/8"], "ipv6 loopback ::1"),
        ("127.0.0.1", ["::1/128"], LOOP),
        ("::1", ["::1/128"], None),
        ("fd00:ec2::254", ["fd00::/8"], None),
        ("fd00:ec2::254", ["fe80::/10"], "aws-metadata fd00:ec2::254"),
        # public addresses need no opening
        ("1.1.1.1", [], None),
        ("203.0.113.5", [], None),
        ("2606:4700:4700::1111", [], None),
    ],
)
def test_check_address(addr: str, opened: list[str], expected: str | None) -> None:
    assert check_address(ip_address(addr), _nets(*opened)) == expected


def test_is_allowed_internal() -> None:
    assert is_allowed_internal(IPv4Address("127.0.0.1"), _nets("127.0.0.0/8"))
    assert not is_allowed_internal(IPv4Address("127.0.0.1"), [])
    assert not is_allowed_internal(IPv4Address("127.0.0.1"), _nets("::/0"))
    assert is_allowed_internal(IPv6Address("::ffff:10.0.0.1"), _nets("10.0.0.0/8"))
    assert not is_allowed_internal(IPv6Address("64:ff9b::a00:1"), _nets("10.0.0.0/8"))


def test_rejects_non_addresses() -> None:
    with pytest.raises(TypeError):
        internal_range("127.0.0.1")  # type: ignore[arg-type]
