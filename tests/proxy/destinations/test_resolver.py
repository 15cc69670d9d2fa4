"""Resolve, check, pin against a real (loopback) DNS server that counts queries."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import dns.resolver
import pytest

from proxy.core.decision import Reason
from proxy.core.destination import Destination, DestinationCheck, DestinationRefused
from proxy.destinations.resolver import Resolver, parse_nameserver
from tests.dnsfake import FakeDns
from tests.harness import closed_port

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[FakeDns]:
    with FakeDns() as server:
        yield server


def make(fake: FakeDns, **kwargs: object) -> Resolver:
    kwargs.setdefault("timeout", 1.0)
    return Resolver([fake.nameserver], **kwargs)  # type: ignore[arg-type]


def dest(resolver: Resolver, host: object, allow_internal: tuple[object, ...] = ()) -> Destination:
    return asyncio.run(DestinationCheck(resolver).destination(host, 443, allow_internal))  # type: ignore[arg-type]


def refused(
    resolver: Resolver, host: object, allow_internal: tuple[object, ...] = ()
) -> DestinationRefused:
    with pytest.raises(DestinationRefused) as info:
        dest(resolver, host, allow_internal)
    return info.value


# --- public answers ------------------------------------------------------------------------------


def test_public_name_resolves_to_checked_address(fake: FakeDns) -> None:
    fake.set("pypi.test", "A", ["203.0.113.10"])
    d = dest(make(fake), "PyPI.Test.")
    assert d == Destination("pypi.test", 443, "203.0.113.10", ("203.0.113.10",))
    assert sorted(q[1] for q in fake.queries) == ["A", "AAAA"]
    assert {q[0] for q in fake.queries} == {"pypi.test"}


@pytest.mark.parametrize("address", ["192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1"])
def test_documentation_ranges_are_not_internal(fake: FakeDns, address: str) -> None:
    fake.set("doc.test", "AAAA" if ":" in address else "A", [address])
    assert dest(make(fake), "doc.test").address == address


def test_ipv4_is_preferred_when_both_families_answer(fake: FakeDns) -> None:
    fake.set("dual.test", "A", ["203.0.113.5"])
    fake.set("dual.test", "AAAA", ["2001:db8::5"])
    d = dest(make(fake), "dual.test")
    assert d.address == "203.0.113.5"
    assert d.addresses == ("203.0.113.5", "2001:db8::5")


def test_aaaa_only_name_works(fake: FakeDns) -> None:
    fake.set("v6only.test", "AAAA", ["2001:db8::10"])
    fake.set("v6only.test", "A", [])  # NODATA for A
    d = dest(make(fake), "v6only.test")
    assert d.address == "2001:db8::10"
    assert d.addresses == ("2001:db8::10",)


def test_cname_chain_to_public_address(fake: FakeDns) -> None:
    fake.set("alias.test", "CNAME", ["mid.test."])
    fake.set("mid.test", "CNAME", ["real.test."])
    fake.set("real.test", "A", ["198.51.100.7"])
    assert dest(make(fake), "alias.test").address == "198.51.100.7"


# --- internal answers ----------------------------------------------------------------------------

INTERNAL_V4 = [
    "127.0.0.1",
    "127.9.9.9",
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.1.1",
    "100.64.0.1",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
]
INTERNAL_V6 = [
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd00:ec2::254",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1 (obfuscated)
]


@pytest.mark.parametrize("address", INTERNAL_V4 + INTERNAL_V6)
def test_internal_answer_is_refused(fake: FakeDns, address: str) -> None:
    fake.set("evil.test", "AAAA" if ":" in address else "A", [address])
    exc = refused(make(fake), "evil.test")
    assert exc.reason is Reason.INTERNAL_ADDRESS
    assert exc.address == address
    assert "evil.test" in exc.detail and address in exc.detail


def test_metadata_detail_names_address_and_range(fake: FakeDns) -> None:
    fake.set("metadata.test", "A", ["169.254.169.254"])
    exc = refused(make(fake), "metadata.test")
    assert exc.detail.startswith("metadata.test resolves to 169.254.169.254 (")
    assert "metadata" in exc.detail.split("(", 1)[1]


def test_mixed_answers_never_yield_the_internal_one(fake: FakeDns) -> None:
    fake.set("mixed.test", "A", ["127.0.0.1", "203.0.113.10", "10.1.2.3", "169.254.169.254"])
    fake.set("mixed.test", "AAAA", ["::1", "64:ff9b::a00:1"])
    for _ in range(10):  # the fake shuffles record order on the wire
        resolver = make(fake)
        d = dest(resolver, "mixed.test")
        assert d.address == "203.0.113.10"
        assert d.addresses == ("203.0.113.10",)


def test_mixed_across_families_picks_the_public_family(fake: FakeDns) -> None:
    fake.set("split.test", "A", ["10.0.0.1"])
    fake.set("split.test", "AAAA", ["2001:db8::99"])
    assert dest(make(fake), "split.test").address == "2001:db8::99"


def test_cname_chain_into_internal_is_refused(fake: FakeDns) -> None:
    fake.set("cdn.test", "CNAME", ["edge.test."])
    fake.set("edge.test", "CNAME", ["inside.corp.test."])
    fake.set("inside.corp.test", "A", ["10.20.30.40"])
    exc = refused(make(fake), "cdn.test")
    assert exc.reason is Reason.INTERNAL_ADDRESS
    assert exc.address == "10.20.30.40"


def test_allow_internal_opens_only_its_range(fake: FakeDns) -> None:
    fake.set("local.test", "A", ["127.0.0.1"])
    fake.set("meta.test", "A", ["169.254.169.254"])
    fake.set("corp.test", "A", ["10.0.0.1"])
    resolver = make(fake)
    assert dest(resolver, "local.test", LOOPBACK).address == "127.0.0.1"
    assert refused(resolver, "meta.test", LOOPBACK).reason is Reason.INTERNAL_ADDRESS
    assert refused(resolver, "corp.test", LOOPBACK).reason is Reason.INTERNAL_ADDRESS
    assert refused(resolver, "local.test").reason is Reason.INTERNAL_ADDRESS  # not opened: refused


# --- rebinding -----------------------------------------------------------------------------------


def test_rebinding_returns_checked_address_then_refuses_after_expiry(fake: FakeDns) -> None:
    fake.set_sequence("rebind.test", "A", [["203.0.113.10"], ["127.0.0.1"]], ttl=0)
    clock = Clock()
    resolver = make(fake, min_ttl=5, clock=clock)
    first = dest(resolver, "rebind.test")
    assert first.address == "203.0.113.10"
    assert first.addresses == ("203.0.113.10",)
    clock.now += 4  # within the floor: the checked answer is reused, no new query
    assert dest(resolver, "rebind.test").address == "203.0.113.10"
    assert fake.queries.count(("rebind.test", "A", "udp")) == 1
    clock.now += 2  # expired: the rebound answer is checked and refused, never returned
    exc = refused(resolver, "rebind.test")
    assert exc.reason is Reason.INTERNAL_ADDRESS
    assert exc.address == "127.0.0.1"
    assert fake.queries.count(("rebind.test", "A", "udp")) == 2
    assert first.address == "203.0.113.10"  # the pin handed out earlier is unchanged


def test_rebinding_without_cache_floor(fake: FakeDns) -> None:
    fake.set_sequence("rebind0.test", "A", [["198.51.100.1"], ["169.254.169.254"]], ttl=0)
    resolver = make(fake, min_ttl=0)
    assert dest(resolver, "rebind0.test").address == "198.51.100.1"
    assert refused(resolver, "rebind0.test").address == "169.254.169.254"


# --- failures ------------------------------------------------------------------------------------


def test_timeout_is_dns_failure(fake: FakeDns) -> None:
    fake.timeout("slow.test")
    started = time.monotonic()
    exc = refused(make(fake, timeout=0.3), "slow.test")
    assert exc.reason is Reason.DNS_FAILURE
    assert exc.address is None
    assert time.monotonic() - started < 3
    assert fake.count("slow.test") >= 2  # it did ask (A and AAAA), and did not allow


def test_servfail_is_dns_failure(fake: FakeDns) -> None:
    fake.servfail("broken.test")
    exc = refused(make(fake), "broken.test")
    assert exc.reason is Reason.DNS_FAILURE
    assert "broken.test" in exc.detail


def test_servfail_inside_cname_chain_is_dns_failure(fake: FakeDns) -> None:
    fake.set("via.test", "CNAME", ["broken.test."])
    fake.servfail("broken.test")
    assert refused(make(fake), "via.test").reason is Reason.DNS_FAILURE


def test_nxdomain_is_dns_failure(fake: FakeDns) -> None:
    exc = refused(make(fake), "missing.test")
    assert exc.reason is Reason.DNS_FAILURE
    assert "NXDOMAIN" in exc.detail


def test_nodata_is_dns_failure(fake: FakeDns) -> None:
    fake.set("txtonly.test", "TXT", ["hello"])
    assert refused(make(fake), "txtonly.test").reason is Reason.DNS_FAILURE


def test_no_nameservers_is_dns_failure() -> None:
    assert refused(Resolver([]), "pypi.test").reason is Reason.DNS_FAILURE


def test_missing_system_configuration_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_config(self: object, filename: object) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")  # type: ignore[no-untyped-call]

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", no_config)
    resolver = Resolver()  # the system's configuration, which is unusable here
    assert refused(resolver, "pypi.test").reason is Reason.DNS_FAILURE


def test_unreachable_nameserver_is_dns_failure() -> None:
    port = closed_port(socket.SOCK_DGRAM)  # nothing listens there
    resolver = Resolver([f"127.0.0.1:{port}"], timeout=0.5)
    assert refused(resolver, "pypi.test").reason is Reason.DNS_FAILURE


def test_invalid_host_is_refused_without_a_query(fake: FakeDns) -> None:
    for host in ["bad host.test", "a..b.test", "x\r\n.test", "user@pypi.test", ""]:
        assert refused(make(fake), host).reason is Reason.INVALID_HOST
    assert fake.queries == []


# --- IP literals: checked, never resolved ------------------------------------------------------

METADATA_SPELLINGS = [
    "169.254.169.254",
    "2852039166",
    "0xa9fea9fe",
    "0xA9.0xFE.0xA9.0xFE",
    "0251.0376.0251.0376",
    "169.254.43518",
    "[::ffff:169.254.169.254]",
    "::ffff:a9fe:a9fe",
    "[64:ff9b::a9fe:a9fe]",
    "[fd00:ec2::254]",
    IPv4Address("169.254.169.254"),
]
LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[0:0:0:0:0:ffff:7f00:1]",
    "[2002:7f00:1::]",
    IPv6Address("::1"),
]


@pytest.mark.parametrize("literal", METADATA_SPELLINGS + LOOPBACK_SPELLINGS, ids=str)
def test_internal_literals_are_refused_without_dns(fake: FakeDns, literal: object) -> None:
    exc = refused(make(fake), literal)
    assert exc.reason is Reason.INTERNAL_ADDRESS
    assert exc.address is not None
    assert fake.queries == []


def test_loopback_literal_opened_by_allow_internal(fake: FakeDns) -> None:
    d = dest(make(fake), "127.1", LOOPBACK)
    assert d == Destination("127.0.0.1", 443, "127.0.0.1", ("127.0.0.1",))
    assert fake.queries == []


@pytest.mark.parametrize("literal", ["203.0.113.7", "[2001:db8::7]", IPv4Address("198.51.100.3")])
def test_public_literal_is_its_own_address(fake: FakeDns, literal: object) -> None:
    d = dest(make(fake), literal)
    assert d.address == str(literal).strip("[]")
    assert fake.queries == []


# --- cache ---------------------------------------------------------------------------------------


def test_ttl_ceiling(fake: FakeDns) -> None:
    fake.set("long.test", "A", ["203.0.113.1"], ttl=86400)
    clock = Clock()
    resolver = make(fake, max_ttl=300, clock=clock)
    dest(resolver, "long.test")
    clock.now += 299
    dest(resolver, "long.test")
    assert fake.queries.count(("long.test", "A", "udp")) == 1
    clock.now += 2
    dest(resolver, "long.test")
    assert fake.queries.count(("long.test", "A", "udp")) == 2


def test_answer_ttl_is_respected_between_floor_and_ceiling(fake: FakeDns) -> None:
    fake.set("mid.test", "A", ["203.0.113.1"], ttl=30)
    clock = Clock()
    resolver = make(fake, clock=clock)
    dest(resolver, "mid.test")
    clock.now += 29
    dest(resolver, "mid.test")
    assert fake.queries.count(("mid.test", "A", "udp")) == 1
    clock.now += 2
    dest(resolver, "mid.test")
    assert fake.queries.count(("mid.test", "A", "udp")) == 2


def test_negative_answers_are_cached_briefly(fake: FakeDns) -> None:
    clock = Clock()
    resolver = make(fake, clock=clock, negative_ttl=1.0)
    refused(resolver, "nope.test")
    refused(resolver, "nope.test")
    assert fake.count("nope.test") == 2
    clock.now += 1.5
    refused(resolver, "nope.test")
    assert fake.count("nope.test") == 4


def test_cache_is_bounded_lru(fake: FakeDns) -> None:
    for name in ["one.test", "two.test", "three.test"]:
        fake.set(name, "A", ["203.0.113.1"])
        fake.set(name, "AAAA", [])
    resolver = make(fake, cache_size=4, clock=Clock())  # two names, A + AAAA each
    for name in ["one.test", "two.test", "three.test"]:
        dest(resolver, name)
    assert len(resolver._cache) == 4
    dest(resolver, "one.test")  # evicted: asked again
    assert fake.count("one.test") == 4
    dest(resolver, "three.test")  # still cached
    assert fake.count("three.test") == 2


def test_concurrent_lookups_share_one_query(fake: FakeDns) -> None:
    fake.set("busy.test", "A", ["203.0.113.9"])

    async def many() -> list[Destination]:
        resolver = make(fake)
        return await asyncio.gather(
            *(DestinationCheck(resolver).destination("busy.test", 443, ()) for _ in range(20))
        )

    results = asyncio.run(many())
    assert {d.address for d in results} == {"203.0.113.9"}
    assert fake.queries.count(("busy.test", "A", "udp")) == 1


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
    ],
)
def test_parse_nameserver(entry: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize("entry", ["dns.test", "127.0.0.1:0", "127.0.0.1:70000", "[::1", "[::1]x"])
def test_parse_nameserver_rejects(entry: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(entry)


def test_ipv6_nameserver(fake: FakeDns) -> None:
    try:
        server = FakeDns("::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        server.set("six.test", "A", ["203.0.113.6"])
        resolver = Resolver([server.nameserver], timeout=1.0)
        assert dest(resolver, "six.test").address == "203.0.113.6"
    finally:
        server.stop()


def test_when_dnspython_cannot_be_imported_lookups_fail_closed_and_are_not_cached(
    fake: FakeDns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dnspython is imported at the first upstream question; if that import fails, the connection is
    refused (dns-failure), nothing is asked upstream, and the failure is not kept: once the import
    works, the same name resolves."""
    from proxy.destinations import resolver as resolver_module
    from proxy.runtime.lazy import LazyImport

    fake.set("pypi.org", "A", ["93.184.216.34"])
    resolver = make(fake)
    monkeypatch.setattr(resolver_module, "DNSQUERY", LazyImport("proxy.destinations.no_such"))
    refusal = refused(resolver, "pypi.org")
    assert refusal.reason == Reason.DNS_FAILURE
    assert "could not start" in str(refusal)
    assert fake.count() == 0
    monkeypatch.setattr(resolver_module, "DNSQUERY", LazyImport("proxy.destinations.dnsquery"))
    assert str(dest(resolver, "pypi.org").address) == "93.184.216.34"


def test_a_resolver_configuration_that_cannot_be_read_refuses_as_a_dns_failure(
    fake: FakeDns, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """dnspython's resolver is built at the first upstream question, after the gate started; a
    resolv.conf it cannot read (``nameserver foo``: ValueError, a stray byte: UnicodeDecodeError)
    is a dns-failure refusal like a missing one, not an exception out of the destination check.
    It is not kept: a repaired configuration answers the next question."""
    import dns.asyncresolver

    from proxy.destinations import dnsquery

    fake.set("pypi.org", "A", ["93.184.216.34"])
    bad = tmp_path / "resolv.conf"
    real_upstream = dnsquery.upstream

    def upstream(nameservers: object, timeout: float) -> dns.asyncresolver.Resolver:
        return dns.asyncresolver.Resolver(filename=str(bad), configure=True)

    resolver = make(fake)
    monkeypatch.setattr(dnsquery, "upstream", upstream)
    for content in (b"nameserver foo\n", b"\xff\xfe\n"):
        bad.write_bytes(content)
        refusal = refused(resolver, "pypi.org")
        assert refusal.reason == Reason.DNS_FAILURE
        assert "could not start" in str(refusal)
    assert fake.count() == 0
    monkeypatch.setattr(dnsquery, "upstream", real_upstream)
    assert str(dest(resolver, "pypi.org").address) == "93.184.216.34"
