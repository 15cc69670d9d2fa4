"""From an allowed host to the one address the gate may dial: resolve, screen every answer, pin one.

An allowlisted name is only as safe as the addresses it resolves to. Every answer is screened against
the internal ranges (:mod:`proxy.core.addresses`) unless the policy's ``allow_internal`` opens them on
purpose; internal answers are dropped, and a name with nothing but internal answers is refused. IP
literals are screened the same way without any lookup.

DNS rebinding is defeated by *pinning*, not by caching: the gate connects only to
:attr:`Destination.address`, one of the addresses screened in the very call that returned it. Nothing
resolves the name again between the check and the connect.

Where names come from is not decided here: a :class:`NameResolver` (the hosts file, then DNS) returns
unscreened answers. With no resolver (``egress check`` without ``--resolve``) a name stays unresolved
and the caller says that its verdict depends on DNS.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Protocol

from proxy.core.addresses import check_address
from proxy.core.decision import Decision, Reason, Verdict
from proxy.core.hosts import InvalidHost, canonical_host

Network = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


class DestinationRefused(Exception):
    """The destination must not be connected to; ``reason`` is the decision's reason code."""

    def __init__(self, reason: Reason, detail: str, address: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.address = address

    def refusing(self, decision: Decision) -> Decision:
        """``decision`` refused by this check: its reason, detail and address."""
        return decision.with_(
            decision=Verdict.DENY, reason=self.reason, detail=self.detail, address=self.address
        )


@dataclass(frozen=True, slots=True)
class Destination:
    """A screened destination. Connect to ``address`` and nothing else (that is the pin).

    ``address`` is None only for a name that was deliberately not resolved (a dry run)."""

    host: str  # canonical name, or the address text for IP literals
    port: int
    address: str | None  # the screened address to connect to (IPv4 preferred)
    addresses: tuple[str, ...]  # every acceptable screened address, ``address`` first


@dataclass(frozen=True, slots=True)
class Answers:
    """What a name resolved to, unscreened. ``failure`` explains an empty answer."""

    addresses: tuple[str, ...]
    failure: str | None = None


class NameResolver(Protocol):
    async def resolve(self, name: str) -> Answers: ...


def screen(
    addresses: Sequence[str], allow_internal: Sequence[Network]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split answers into (acceptable, [(internal address, range)]); unparseable answers are refused."""
    good: list[str] = []
    bad: list[tuple[str, str]] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            bad.append((text, "not an IP address"))
            continue
        why = check_address(ip, allow_internal)
        if why is None:
            good.append(text)
        else:
            bad.append((text, why))
    return good, bad


def connectable(text: str) -> str:
    """IPv4-mapped IPv6 answers connect as the IPv4 they are (they were screened as that too)."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class DestinationCheck:
    """Screens and pins destinations; the only way a host becomes an address the gate dials."""

    def __init__(self, names: NameResolver | None) -> None:
        self.names = names

    async def destination(
        self, host: str | IPAddress, port: int, allow_internal: Sequence[Network]
    ) -> Destination:
        """Raises :class:`DestinationRefused` (``internal-address``, ``dns-failure``, ``invalid-host``)."""
        if isinstance(host, str):
            try:
                host = canonical_host(host)
            except InvalidHost as exc:
                raise DestinationRefused(Reason.INVALID_HOST, f"invalid host: {exc}") from None
        if not isinstance(host, str):
            return literal_destination(host, port, allow_internal)
        if self.names is None:
            return Destination(host=host, port=port, address=None, addresses=())
        answers = await self.names.resolve(host)
        if not answers.addresses:
            raise DestinationRefused(
                Reason.DNS_FAILURE, answers.failure or f"{host} has no A or AAAA records"
            )
        good, bad = screen(answers.addresses, allow_internal)
        if not good:
            address, why = bad[0]
            raise DestinationRefused(
                Reason.INTERNAL_ADDRESS, f"{host} resolves to {address} ({why})", address
            )
        pinned = list(dict.fromkeys(connectable(a) for a in good))  # ordered, without duplicates
        return Destination(host=host, port=port, address=pinned[0], addresses=tuple(pinned))


def literal_destination(ip: IPAddress, port: int, allow_internal: Sequence[Network]) -> Destination:
    ranges = allow_internal if isinstance(allow_internal, tuple) else tuple(allow_internal)
    screened = _literal(ip, port, ranges)
    if isinstance(screened, Destination):
        return screened
    raise DestinationRefused(Reason.INTERNAL_ADDRESS, *screened)


def still_open(
    decision: Decision, address: str | None, port: int | None, allow_internal: Sequence[Network]
) -> Decision:
    """``decision``, or its refusal when ``address`` (where its connection is pinned) is in an
    internal range ``allow_internal`` no longer opens: a reload that closes a range refuses a new
    CONNECT there, so a connection admitted or relayed there under the old policy is refused too."""
    if address is None or port is None:
        return decision
    try:
        literal_destination(ipaddress.ip_address(address), port, allow_internal)
    except DestinationRefused as exc:
        return exc.refusing(decision)
    return decision


@functools.lru_cache(maxsize=4096)
def _literal(
    ip: IPAddress, port: int, allow_internal: tuple[Network, ...]
) -> Destination | tuple[str, str]:
    """A literal's screening is a pure function of the address and the ranges the policy opens
    (a reload that changes them asks anew), and a kept-alive connection to an address asks it on
    every request: answered once. A refusal is (detail, address), raised afresh each time."""
    address = connectable(str(ip))
    why = check_address(ip, allow_internal)
    if why is not None:
        return f"{ip} is an internal address ({why})", address
    return Destination(host=str(ip), port=port, address=address, addresses=(address,))


__all__ = [
    "Answers",
    "Destination",
    "DestinationCheck",
    "DestinationRefused",
    "NameResolver",
    "connectable",
    "literal_destination",
    "screen",
    "still_open",
]
