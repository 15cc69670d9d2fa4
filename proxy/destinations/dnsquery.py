"""dnspython's side of :class:`proxy.destinations.resolver.Resolver`: one question asked upstream.

Imported by the resolver at its first upstream question (or when a long-running gate warms it), off
the event loop (see :mod:`proxy.runtime.lazy`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from proxy.destinations.resolver import Lookup

if TYPE_CHECKING:
    from proxy.destinations.resolver import RdType

log = logging.getLogger(__name__)


def upstream(
    nameservers: list[tuple[str, int]] | None, timeout: float
) -> dns.asyncresolver.Resolver:
    """dnspython's resolver for these (already parsed) nameservers; None reads the system's
    ``/etc/resolv.conf``, and a missing or empty configuration leaves none: every lookup fails."""
    if nameservers is None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration as exc:
            log.error("no usable resolver configuration (%s): every lookup will fail", exc)
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = []
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers
        ]
        resolver.nameservers = servers
    resolver.cache = None  # the Resolver's own cache applies the floor/ceiling and the size bound
    resolver.lifetime = timeout
    resolver.timeout = timeout
    return resolver


async def ask(
    resolver: dns.asyncresolver.Resolver,
    name: str,
    rdtype: RdType,
    *,
    timeout: float,
    negative_ttl: float,
    min_ttl: float,
    max_ttl: float,
) -> Lookup:
    """One (name, type) question; every failure comes back as a Lookup that says why."""
    try:
        qname = dns.name.from_text(name)  # absolute: no search list
        answer = await resolver.resolve(
            qname, rdtype, raise_on_no_answer=False, lifetime=timeout, search=False
        )
    except dns.resolver.NXDOMAIN:
        return Lookup((), negative_ttl, nxdomain=True)
    except dns.resolver.NoNameservers as exc:
        return Lookup(
            (), negative_ttl, failure=f"every nameserver failed (SERVFAIL or refused): {exc}"
        )
    except dns.exception.Timeout:
        return Lookup((), negative_ttl, failure=f"no answer within {timeout:g}s")
    except Exception as exc:  # YXDOMAIN, bad names, malformed answers, socket errors: closed
        return Lookup((), negative_ttl, failure=f"{type(exc).__name__}: {exc}")
    if answer.rrset is None:  # NODATA: the name exists without this type
        return Lookup((), negative_ttl)
    addresses = tuple(rdata.address for rdata in answer.rrset)
    ttl = min(max(float(answer.chaining_result.minimum_ttl), min_ttl), max_ttl)
    return Lookup(addresses, ttl)
