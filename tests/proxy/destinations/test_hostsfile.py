"""Hosts-file names: parsed strictly, answered before DNS (no query leaves), screened like DNS answers,
and re-read when the file changes."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.decision import Reason
from proxy.core.destination import DestinationCheck, DestinationRefused
from proxy.destinations.hostsfile import HostsFile, parse_hosts
from proxy.destinations.resolver import Resolver
from tests.dnsfake import FakeDns

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def test_parse_hosts_lines() -> None:
    entries = parse_hosts(
        "# comment\n"
        "127.0.0.1 localhost Localhost.\n"
        "::1 localhost ip6-localhost  # trailing comment\n"
        "10.0.0.7\tmirror.internal pypi-mirror\n"
        "not-an-address some.name\n"
        "10.0.0.8 bad..name good.name\n"
        "10.0.0.9 10.0.0.10\n"
        "fe80::1%eth0 linklocal.test\n"
        "10.0.0.7 mirror.internal\n"
    )
    assert entries["localhost"] == (("127.0.0.1",), ("::1",))
    assert entries["ip6-localhost"] == ((), ("::1",))
    assert entries["pypi-mirror"] == (("10.0.0.7",), ())
    assert entries["mirror.internal"] == (("10.0.0.7",), ())  # no duplicate address
    assert entries["good.name"] == (("10.0.0.8",), ())
    assert entries["linklocal.test"] == ((), ("fe80::1",))
    assert "some.name" not in entries and "bad..name" not in entries and "10.0.0.10" not in entries


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 one.test\n")
    clock = Clock()
    hosts = HostsFile(path, clock=clock)
    assert hosts.lookup("one.test") == (("127.0.0.1",), ())
    path.write_text("127.0.0.2 two.test\n")
    os.utime(path, ns=(1, 1))  # a changed identity even within one clock tick of the filesystem
    assert hosts.lookup("two.test") is None  # not re-checked within the recheck interval
    clock.now += 1.5
    assert hosts.lookup("two.test") == (("127.0.0.2",), ())
    assert hosts.lookup("one.test") is None


def test_an_unreadable_file_names_nothing(tmp_path: Path) -> None:
    hosts = HostsFile(tmp_path / "missing")
    assert hosts.lookup("localhost") is None


@pytest.fixture
def dns() -> Iterator[FakeDns]:
    with FakeDns() as server:
        server.set("mirror.internal", "A", ["203.0.113.66"])  # what DNS would say: never asked
        yield server


def test_listed_names_never_reach_dns_and_are_screened(tmp_path: Path, dns: FakeDns) -> None:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 mirror.internal\n10.9.9.9 inside.internal\n")
    resolver = Resolver([dns.nameserver], timeout=1, hosts_file=str(path))
    check = DestinationCheck(resolver)
    dest = asyncio.run(check.destination("mirror.internal", 443, LOOPBACK))
    assert dest.address == "127.0.0.1"
    with pytest.raises(DestinationRefused) as refused:
        asyncio.run(check.destination("mirror.internal", 443, ()))  # loopback not opened
    assert refused.value.reason is Reason.INTERNAL_ADDRESS
    with pytest.raises(DestinationRefused) as inside:
        asyncio.run(check.destination("inside.internal", 443, LOOPBACK))
    assert inside.value.reason is Reason.INTERNAL_ADDRESS
    assert dns.queries == []


def test_names_not_listed_go_to_dns(tmp_path: Path, dns: FakeDns) -> None:
    path = tmp_path / "hosts"
    path.write_text("127.0.0.1 other.internal\n")
    resolver = Resolver([dns.nameserver], timeout=1, hosts_file=str(path))
    dest = asyncio.run(DestinationCheck(resolver).destination("mirror.internal", 443, ()))
    assert dest.address == "203.0.113.66"
    assert {q[0] for q in dns.queries} == {"mirror.internal"}


def test_no_hosts_file_means_dns_only(dns: FakeDns) -> None:
    resolver = Resolver([dns.nameserver], timeout=1, hosts_file=None)
    assert resolver.hosts is None
