"""The gate's own listeners, on any address of this host, are never a destination."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.destinations.local import OwnEndpoints, host_addresses

HOST = {ipaddress.ip_address(a) for a in ("127.0.0.1", "8.8.9.100", "2a00:1450::100", "::1")}


def own(*listeners: tuple[str, int]) -> OwnEndpoints:
    return OwnEndpoints(listeners, addresses=lambda: set(HOST))


@pytest.mark.parametrize(
    "address",
    [
        "8.8.9.100",
        "2a00:1450::100",
        "::ffff:8.8.9.100",
        "::8.8.9.100",  # IPv4-compatible (deprecated): delivered to the IPv4 address over SIT
        "::127.0.0.1",
        "127.0.0.1",
        "127.9.9.9",
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "::1",
    ],
)
def test_a_wildcard_listener_is_reached_on_every_local_address(address: str) -> None:
    assert own(("0.0.0.0", 3128)).is_self(address, 3128)


def test_other_ports_and_other_hosts_are_not_the_gate() -> None:
    endpoints = own(("0.0.0.0", 3128))
    assert not endpoints.is_self("8.8.9.100", 3129)
    assert not endpoints.is_self("8.8.9.101", 3128)
    assert not endpoints.is_self("203.0.113.7", 3128)


def test_a_specific_listener_is_its_address_and_this_hosts_loopback() -> None:
    endpoints = own(("10.0.0.5", 3128))
    assert endpoints.is_self("10.0.0.5", 3128)
    assert endpoints.is_self("127.0.0.1", 3128)  # conservative: loopback is this host
    assert not endpoints.is_self("8.8.9.100", 3128)  # a local address the listener is not bound to


def test_interface_addresses_are_read_when_the_port_matches() -> None:
    calls = []

    def addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        calls.append(1)
        return {ipaddress.ip_address("192.0.2.55")}

    endpoints = OwnEndpoints([("::", 53)], addresses=addresses)
    assert not endpoints.is_self("192.0.2.55", 80)
    assert calls == []  # another port: no interface read
    assert endpoints.is_self("192.0.2.55", 53)
    assert calls == [1]


def test_the_real_host_addresses_include_loopback() -> None:
    assert ipaddress.ip_address("127.0.0.1") in host_addresses()
