"""Resolve, check, pin: the only way a destination name becomes an address the gate connects to.

An allowlisted name is only as safe as the addresses it resolves to. Every address of every answer is
checked against the internal ranges (``proxy.core.addresses``) unless the policy's ``allow_internal`` opens
them on purpose; internal answers are dropped, and a name with nothing but internal answers is refused.

DNS rebinding is defeated by *pinning*, not by caching: callers connect only to
:attr:`Destination.address`, which is one of the addresses checked in the very call that returned it.
Nothing ever resolves the name a second time between the check and the connect, so a name whose next
answer (TTL 0) is ``127.0.0.1`` can change what the *next* call returns - which is checked again - but
never what this one connects to.

Failures never widen access: NXDOMAIN, SERVFAIL, timeouts, empty answers and a missing resolver
configuration all raise :class:`DestinationRefused` with reason ``dns-failure``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from proxy.core.addresses import check_address
from proxy.core.decision import Reason
from proxy.core.hosts import InvalidHost, canonical_host

__all__ = [
    "Destination",
    "DestinationRefused",
    "Lookup",
    "Network",
    "Resolver",
    "check_addresses",
    "parse_nameserver",
]

log = logging.getLogger(__name__)

Network = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address
RdType = Literal["A", "AAAA"]


class DestinationRefused(Exception):
    """The destination must not be connected to; ``reason`` is the decision's reason code."""

    def __init__(self, reason: Reason, detail: str, address: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.address = address


@dataclass(frozen=True, slots=True)
class Destination:
    """A checked destination. Connect to ``address`` and nothing else (that is the pin)."""

    host: str  # canonical name, or the address text for IP literals
    port: int
    address: str  # the checked address to connect to (IPv4 preferred)
    addresses: tuple[str, ...]  # every acceptable checked address, ``address`` first


@dataclass(frozen=True, slots=True)
class Lookup:
    """One (name, type) answer from upstream, unchecked. ``failure`` set means the lookup failed
    (SERVFAIL, timeout, no nameservers); ``nxdomain`` means the name does not exist."""

    addresses: tuple[str, ...]
    ttl: float  # seconds this answer stays valid, already clamped to the resolver's floor/ceiling
    nxdomain: bool = False
    failure: str | None = None


@dataclass(slots=True)
class _Entry:
    lookup: Lookup
    expires: float


def parse_nameserver(entry: str) -> tuple[str, int]:
    """``ip``, ``ip:port``, ``v6`` or ``[v6]:port`` -> (ip, port); anything else is a ValueError."""
    text = entry.strip()
    host, port = text, 53
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not text[end + 1 :].startswith(":")):
            raise ValueError(f"bad nameserver {entry!r}: expected [v6]:port")
        host = text[1:end]
        if text[end + 1 :]:
            port = int(text[end + 2 :])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # nameservers are addresses: a name here would need DNS to find DNS
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver {entry!r}: port out of range")
    return host, port


def check_addresses(
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


class Resolver:
    """dnspython's async resolver behind a bounded, TTL-clamped cache, answering one question: which
    checked address may this connection go to?

    ``nameservers`` None reads the system's ``/etc/resolv.conf``; a missing or empty configuration
    leaves no nameservers, so every lookup fails (closed). Search domains are never applied: the
    policy allowed this exact name, not ``name.corp.example``.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        timeout: float = 3.0,
        min_ttl: float = 5,
        max_ttl: float = 300,
        cache_size: int = 10_000,
        *,
        negative_ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        self.timeout = timeout
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[tuple[str, RdType], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, RdType], asyncio.Task[Lookup]] = {}
        if nameservers is None:
            try:
                self._dns = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as exc:
                log.error("no usable resolver configuration (%s): every lookup will fail", exc)
                self._dns = dns.asyncresolver.Resolver(configure=False)
                self._dns.nameservers = []
        else:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for entry in nameservers:
                host, port = parse_nameserver(entry)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self._dns.nameservers = servers
        self._dns.cache = None  # our own cache below applies the floor/ceiling and the size bound
        self._dns.lifetime = timeout
        self._dns.timeout = timeout

    async def destination(
        self, host: str | IPAddress, port: int, allow_internal: Sequence[Network]
    ) -> Destination:
        """Resolve (unless ``host`` is an IP literal), check every address, pick the one to connect to.

        Raises :class:`DestinationRefused` (``internal-address``, ``dns-failure`` or ``invalid-host``).
        """
        if isinstance(host, str):
            try:
                host = canonical_host(host)
            except InvalidHost as exc:
                raise DestinationRefused(Reason.INVALID_HOST, f"invalid host: {exc}") from None
        if not isinstance(host, str):
            return self._literal(host, port, allow_internal)
        v4, v6 = await asyncio.gather(self.lookup(host, "A"), self.lookup(host, "AAAA"))
        answers = (*v4.addresses, *v6.addresses)
        if not answers:
            raise DestinationRefused(Reason.DNS_FAILURE, _failure_detail(host, v4, v6))
        good, bad = check_addresses(answers, allow_internal)
        if not good:
            address, why = bad[0]
            raise DestinationRefused(
                Reason.INTERNAL_ADDRESS, f"{host} resolves to {address} ({why})", address
            )
        if bad:
            log.info("%s: dropped internal answers %s", host, ", ".join(a for a, _ in bad))
        pinned = list(dict.fromkeys(_connectable(a) for a in good))  # ordered, without duplicates
        return Destination(host=host, port=port, address=pinned[0], addresses=tuple(pinned))

    def _literal(self, ip: IPAddress, port: int, allow_internal: Sequence[Network]) -> Destination:
        address = _connectable(str(ip))
        why = check_address(ip, allow_internal)
        if why is not None:
            raise DestinationRefused(
                Reason.INTERNAL_ADDRESS, f"{ip} is an internal address ({why})", address
            )
        return Destination(host=str(ip), port=port, address=address, addresses=(address,))

    async def lookup(self, name: str, rdtype: RdType) -> Lookup:
        """The (cached) upstream answer for a canonical name, unchecked: callers must check it.

        Concurrent lookups of one question share a single upstream query.
        """
        key = (name, rdtype)
        entry = self._cache.get(key)
        now = self._clock()
        if entry is not None:
            if entry.expires > now:
                self._cache.move_to_end(key)
                remaining = entry.expires - now
                return Lookup(
                    entry.lookup.addresses, remaining, entry.lookup.nxdomain, entry.lookup.failure
                )
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # shield: one cancelled caller must not cancel the lookup others are waiting for
        return await asyncio.shield(task)

    async def _query(self, name: str, rdtype: RdType) -> Lookup:
        try:
            qname = dns.name.from_text(name)  # absolute: no search list
            answer = await self._dns.resolve(
                qname, rdtype, raise_on_no_answer=False, lifetime=self.timeout, search=False
            )
        except dns.resolver.NXDOMAIN:
            return self._store(name, rdtype, Lookup((), self.negative_ttl, nxdomain=True))
        except dns.resolver.NoNameservers as exc:
            failure = f"every nameserver failed (SERVFAIL or refused): {exc}"
            return self._store(name, rdtype, Lookup((), self.negative_ttl, failure=failure))
        except dns.exception.Timeout:
            failure = f"no answer within {self.timeout:g}s"
            return self._store(name, rdtype, Lookup((), self.negative_ttl, failure=failure))
        except Exception as exc:  # YXDOMAIN, bad names, malformed answers, socket errors: closed
            failure = f"{type(exc).__name__}: {exc}"
            return self._store(name, rdtype, Lookup((), self.negative_ttl, failure=failure))
        if answer.rrset is None:  # NODATA: the name exists without this type
            return self._store(name, rdtype, Lookup((), self.negative_ttl))
        addresses = tuple(rdata.address for rdata in answer.rrset)
        ttl = min(max(float(answer.chaining_result.minimum_ttl), self.min_ttl), self.max_ttl)
        return self._store(name, rdtype, Lookup(addresses, ttl))

    def _store(self, name: str, rdtype: RdType, lookup: Lookup) -> Lookup:
        if self.cache_size <= 0 or lookup.ttl <= 0:
            return lookup
        key = (name, rdtype)
        self._cache[key] = _Entry(lookup, self._clock() + lookup.ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return lookup


def _connectable(text: str) -> str:
    """IPv4-mapped IPv6 answers connect as the IPv4 they are (they were checked as that too)."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _failure_detail(host: str, v4: Lookup, v6: Lookup) -> str:
    failures = [f for f in (v4.failure, v6.failure) if f]
    if failures:
        return f"resolving {host} failed: {'; '.join(failures)}"
    if v4.nxdomain or v6.nxdomain:
        return f"{host} does not exist (NXDOMAIN)"
    return f"{host} has no A or AAAA records"
