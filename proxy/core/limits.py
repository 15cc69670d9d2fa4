"""The gate's resource limits, and the per-client rate limiter that enforces one of them.

Limits exist so that one sandbox (or whatever hijacked it) cannot take the gate away from the others
(threat 13): a concurrent-connection cap per client and for the whole gate, a cap on new connections
per second per client, and deadlines on silent connections. Every refusal they cause is a decision
with its own reason (``connection-limit``, ``rate-limit``, ``request-timeout``, ``idle-timeout``).

The whole-gate cap is fitted to the file descriptors the process may open: each admitted connection can
hold two (client and upstream), and a reserve stays free for the journal, DNS and the listeners. A gate
out of descriptors would otherwise stop accepting and leave clients hanging; with the fitted cap they
are refused, and served again as soon as connections close.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

# journal, resolver sockets, listeners, the export process's pipes, and the /proc files the process
# lookup of a sandbox keeps open (proxy.attribution.procfs.KEPT_FILES and its pid counter: a private
# gate's one sandbox; the per-user gate holds as many again, with its listeners, per sandbox)
DESCRIPTOR_RESERVE = 80


DNS_QUERIES_PER_SECOND = 1_000.0
DNS_QUERIES_BURST = 2_000


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 10_000  # concurrent, whole gate
    max_connections_per_client: int = 512  # concurrent, per sandbox (or per address if unknown)
    new_connections_per_second: float = 500.0  # per client, sustained; 0 disables
    new_connections_burst: int = 1_000  # per client, above the sustained rate
    request_timeout: float = 30.0  # every request head, and a tunnel's first bytes; 0 disables
    idle_timeout: float = 900.0  # a relayed tunnel with no bytes either way; 0 disables
    # DNS questions per client address (the DNS gate), sustained and above it; 0 disables. Twice
    # the new-connection rate: a client asks for A and AAAA before each connection.
    dns_queries_per_second: float = DNS_QUERIES_PER_SECOND
    dns_queries_burst: int = DNS_QUERIES_BURST

    def fitted(self, descriptors: int) -> Limits:
        """These limits with the whole-gate cap no larger than ``descriptors`` can carry."""
        room = max(1, (descriptors - DESCRIPTOR_RESERVE) // 2)
        return replace(self, max_connections=min(self.max_connections, room))


class RateLimiter:
    """A token bucket per client key. Buckets outlive connections (a client that opens and closes
    connections one after another is limited too); full buckets are dropped when there are many."""

    MAX_BUCKETS = 10_000

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.MAX_BUCKETS:
            self._prune(now)
        return True

    def _prune(self, now: float) -> None:
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[key]


__all__ = [
    "DESCRIPTOR_RESERVE",
    "DNS_QUERIES_BURST",
    "DNS_QUERIES_PER_SECOND",
    "Limits",
    "RateLimiter",
]
