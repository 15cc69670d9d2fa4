"""The gate's own listeners and this host's addresses: destinations the gate must never dial.

A gate that dials its own proxy port relays a request into itself, which allows the nested request, and
so on until a connection cap stops it (threat 10). A listener bound to a wildcard (``0.0.0.0``, ``::``)
answers on *every* address of this host, whatever its range, so the check compares a destination with
the host's real interface addresses, read afresh whenever a destination's port is one of the gate's
listening ports (only then can it be the gate, so the cost is paid only there, and an address added
after start-up is still seen). The unspecified addresses (``0.0.0.0/8``, ``::``) and loopback reach
this host too.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address


def host_addresses() -> set[IPAddress]:
    """Every address on every interface of this host (network namespace), IPv4 and IPv6. psutil is
    imported here, on the first destination that could be the gate: importing it costs every gate
    start (each `egress run` with its own gate) ~10 ms."""
    import psutil

    found: set[IPAddress] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                found.add(ipaddress.ip_address(entry.address.split("%", 1)[0]))
            except ValueError:
                continue
    return found


def _reaches_this_host(ip: IPAddress) -> bool:
    if ip.is_loopback or ip.is_unspecified:
        return True
    return isinstance(ip, IPv4Address) and ip.packed[0] == 0  # 0.0.0.0/8: "this network"


class OwnEndpoints:
    """Implements :class:`proxy.core.checkpoint.SelfCheck`."""

    def __init__(
        self,
        listeners: Iterable[tuple[str, int]] = (),
        addresses: Callable[[], set[IPAddress]] = host_addresses,
    ) -> None:
        self._addresses = addresses
        self._listeners: dict[int, set[IPAddress]] = {}
        for host, port in listeners:
            self.add(host, port)

    def add(self, host: str, port: int) -> None:
        ip = ipaddress.ip_address(host.strip("[]") or "0.0.0.0")
        self._listeners.setdefault(port, set()).add(_unmapped(ip))

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(self._listeners)

    def is_self(self, address: str, port: int) -> bool:
        bound = self._listeners.get(port)
        if not bound:
            return False
        try:
            ip = _unmapped(ipaddress.ip_address(address))
        except ValueError:
            return True  # not an address: never dial it
        if ip in bound or _reaches_this_host(ip):
            # loopback and unspecified destinations reach a listener on any local address
            return True
        if any(listener.is_unspecified for listener in bound):
            return ip in self._addresses()
        return False


_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _unmapped(ip: IPAddress) -> IPAddress:
    """An IPv4 address written as IPv6 (mapped, ``::ffff:a.b.c.d``; or the deprecated compatible
    form, ``::a.b.c.d``, which a kernel with a SIT tunnel delivers to that IPv4 address) as IPv4:
    either may reach a listener on its IPv4 address."""
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _COMPATIBLE and int(ip) > 1:  # (:: and ::1 are IPv6's own)
            return IPv4Address(int(ip))
    return ip


__all__ = ["OwnEndpoints", "host_addresses"]
