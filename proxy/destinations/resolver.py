"""Names to addresses for the gate: dnspython's async resolver behind a bounded, TTL-clamped cache.

dnspython itself (:mod:`proxy.destinations.dnsquery`) is imported at the first name asked upstream, in
a thread, or at start with :meth:`Resolver.warm`: a private gate's start does not wait for it, and a
run that connects to no name (or only to names in the hosts file) never pays for it.

Answers are returned unscreened: :class:`proxy.core.destination.DestinationCheck` screens every address
and pins one, and the DNS gate screens what it answers. Failures never widen access: NXDOMAIN, SERVFAIL,
timeouts, empty answers and a missing resolver configuration all come back as an empty answer with the
failure explained, which the callers refuse with reason ``dns-failure``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from proxy.core.destination import Answers
from proxy.core.hosts import parse_endpoint
from proxy.destinations.hostsfile import DEFAULT_HOSTS_FILE, HostsFile
from proxy.runtime.lazy import LazyImport

if TYPE_CHECKING:
    import dns.asyncresolver

__all__ = ["Lookup", "Resolver", "parse_nameserver"]

log = logging.getLogger(__name__)

DNSQUERY = LazyImport("proxy.destinations.dnsquery")

RdType = Literal["A", "AAAA"]


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
    """``ip``, ``ip:port``, ``v6`` or ``[v6]:port`` -> (ip, port); anything else is a ValueError.
    Nameservers are addresses: a name here would need DNS to find DNS."""
    host, port = parse_endpoint(entry, default_port=53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad nameserver {entry!r}: not an IP address") from None
    return host, port


class Resolver:
    """dnspython's async resolver behind a bounded, TTL-clamped cache.

    ``nameservers`` None reads the system's ``/etc/resolv.conf``; a missing or empty configuration
    leaves no nameservers, so every lookup fails (closed). Search domains are never applied: the
    policy allowed this exact name, not ``name.corp.example``. ``hosts_file`` (``/etc/hosts`` by
    default, None for none) is consulted first: a name it lists is answered from it alone.
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
        hosts_file: str | None = DEFAULT_HOSTS_FILE,
    ) -> None:
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        self.timeout = timeout
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.cache_size = cache_size
        self._clock = clock
        self.hosts = HostsFile(hosts_file, clock=clock) if hosts_file else None
        self._cache: OrderedDict[tuple[str, RdType], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, RdType], asyncio.Task[Lookup]] = {}
        # parsed now, so a bad nameserver stops the gate at start; dnspython's resolver is built
        # with them at the first upstream question
        self._nameservers = (
            None if nameservers is None else [parse_nameserver(entry) for entry in nameservers]
        )
        self._dns: dns.asyncresolver.Resolver | None = None

    def warm(self) -> None:
        """Import dnspython now, in the background (a long-running gate's first lookup then does
        not wait for it). Needs the running loop."""
        DNSQUERY.warm()

    @staticmethod
    async def warmed() -> None:
        """Until :meth:`warm`'s import has ended (imported or failed)."""
        await DNSQUERY.settled()

    async def resolve(self, name: str) -> Answers:
        """A and AAAA for a canonical name, unscreened; an empty answer carries the failure."""
        v4, v6 = await asyncio.gather(self.lookup(name, "A"), self.lookup(name, "AAAA"))
        answers = (*v4.addresses, *v6.addresses)
        return Answers(answers, None if answers else _failure_detail(name, v4, v6))

    async def lookup(self, name: str, rdtype: RdType) -> Lookup:
        """The (cached) upstream answer for a canonical name, unchecked: callers must check it.

        Concurrent lookups of one question share a single upstream query.
        """
        if self.hosts is not None:
            listed = self.hosts.lookup(name)
            if listed is not None:
                return Lookup(listed[0] if rdtype == "A" else listed[1], self.min_ttl)
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
            dnsquery: Any = await DNSQUERY.load()
        except Exception as exc:  # not cached: the next question imports again
            log.error("resolver: dnspython could not be imported: %s", exc)
            return Lookup((), 0.0, failure=f"the resolver could not start: {exc}")
        if self._dns is None:
            try:  # reads resolv.conf: ValueError for a bad nameserver line, UnicodeDecodeError...
                self._dns = dnsquery.upstream(self._nameservers, self.timeout)
            except Exception as exc:  # not cached: the next question reads it again
                log.error("resolver: no usable resolver configuration: %s", exc)
                return Lookup((), 0.0, failure=f"the resolver could not start: {exc}")
        lookup: Lookup = await dnsquery.ask(
            self._dns,
            name,
            rdtype,
            timeout=self.timeout,
            negative_ttl=self.negative_ttl,
            min_ttl=self.min_ttl,
            max_ttl=self.max_ttl,
        )
        return self._store(name, rdtype, lookup)

    def _store(self, name: str, rdtype: RdType, lookup: Lookup) -> Lookup:
        if self.cache_size <= 0 or lookup.ttl <= 0:
            return lookup
        key = (name, rdtype)
        self._cache[key] = _Entry(lookup, self._clock() + lookup.ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return lookup


def _failure_detail(host: str, v4: Lookup, v6: Lookup) -> str:
    failures = [f for f in (v4.failure, v6.failure) if f]
    if failures:
        return f"resolving {host} failed: {'; '.join(failures)}"
    if v4.nxdomain or v6.nxdomain:
        return f"{host} does not exist (NXDOMAIN)"
    return f"{host} has no A or AAAA records"
