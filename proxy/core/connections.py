"""What the gate knows about each client connection, and the connection limits that apply to it.

Plain state, no I/O: the checkpoint reads and updates it, the adapters create and drop it as clients
connect and disconnect. A connection is attributed to a sandbox either by the listener that accepted it
(a per-sandbox socket: ``authenticated``) or by the credential its first request proves; until then its
address is the client it counts against. Once a credential proves the sandbox, the connection counts
against that sandbox instead, so sandboxes sharing one address do not share one cap.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.core.decision import Decision, Kind, Reason
from proxy.core.limits import Limits, RateLimiter
from proxy.policy.model import Policy


class Observer(Protocol):
    """Facts that are not decisions (``proxy.evidence.wiring.Evidence`` implements this)."""

    def connection_opened(self, kind: Kind | str = ...) -> None: ...

    def connection_closed(
        self, decision: Decision, *, bytes_out: int, bytes_in: int, duration: float
    ) -> None: ...

    def observe_latency(self, kind: Kind, seconds: float) -> None: ...

    def active_sandboxes(self, count: int) -> None: ...


# Destinations one connection keeps pinned (host:port -> checked address): far more than a client
# names on one connection, and a bound on what a connection naming a new host per request holds.
MAX_PINS = 4096


@dataclass(slots=True)
class Connection:
    """One client connection, for its lifetime."""

    peer: str | None
    sandbox_id: str | None
    policy: Callable[[], Policy] | None = None  # per-sandbox policy once the client is identified
    authenticated: bool = False  # attributed by the per-sandbox listener that accepted it
    limit_key: str = ""  # what the per-client limits count (sandbox id or peer address)
    refusal: tuple[Reason, str] | None = None  # a limit this connection is over
    started: float = field(default_factory=time.monotonic)
    tunnel: Decision | None = None  # the allowed CONNECT decision, once there is one
    inspected: bool = False  # the tunnel's requests are read one by one (TLS terminated)
    opened: Decision | None = None  # the decision a counted upstream connection was opened under
    bytes_out: int = 0  # client -> upstream
    bytes_in: int = 0
    pinned: dict[tuple[str, int], str] = field(default_factory=dict)  # (host, port) -> checked ip
    checked: set[tuple[str, int]] = field(
        default_factory=set
    )  # (ip, port) pairs that may be dialled
    # Set by the front end relaying an admitted tunnel: closes it (``--recheck-on-reload``).
    closer: Callable[[], None] | None = None
    # Whose processes the client may be, fixed when it connects (a gate serving several sandboxes:
    # the sandbox's own, never those of a later sandbox with the same id).
    processes: Any = None
    process: Any = None  # who owns the client socket (proxy.attribution), once looked up
    owners: Any = None  # every owner any lookup saw (what a rule bound to executables checks)
    attributed: bool = False  # looked up (process stays None when it could not be found)
    lookup: Any = None  # the lookup under way (an asyncio future), started when it connected
    # Its lookup started as it opened (its policy then bound a rule to executables): the owner
    # at that moment is one a bound rule checks (threat 19). Without it, a bound rule refuses.
    watched: bool = False
    # Its sandbox has ended: no process is left to read what the gate sends it, and a write would
    # draw a reset that takes the requests it left unread with it (they are still decided).
    gone: bool = False
    closed: bool = False  # closed (``Connections.close``): a lookup ending later is not kept

    def bound_owners(self) -> Any:
        """What a rule bound to executables checks: every owner the lookups saw, once a bound
        rule had them searched for; else the lookup's answer; None when never looked up."""
        if self.owners is not None:
            return self.owners
        return self.process if self.attributed else None

    def pin(self, host: str, port: int, address: str) -> None:
        """(8) ``host:port`` may be dialled at ``address`` on this connection. A kept-alive
        connection can name a new host in every request (a wildcard rule): past MAX_PINS the
        earlier pins are forgotten, so its memory stays bounded; a request whose pin was
        forgotten before its dial is refused, never dialled unchecked."""
        if len(self.pinned) >= MAX_PINS or len(self.checked) >= MAX_PINS:
            self.pinned.clear()
            self.checked.clear()
        self.pinned[(host, port)] = address
        self.checked.add((address, port))

    def forget_destinations(self) -> None:
        """A refused tunnel: nothing may be dialled for this connection any more."""
        self.pinned.clear()
        self.checked.clear()
        self.tunnel = None
        self.inspected = False


class Connections:
    """Live connections: per-client counts for the cap, and the set of active sandboxes."""

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        default_sandbox_id: str | None = None,
        sandbox_policies: dict[str, Callable[[], Policy]] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self._rate = RateLimiter(
            self.limits.new_connections_per_second, self.limits.new_connections_burst
        )
        self.default_sandbox_id = default_sandbox_id
        self.sandbox_policies = sandbox_policies or {}
        self.observer = observer
        self._by_id: dict[str, Connection] = {}
        self._per_client: collections.Counter[str] = collections.Counter()
        self._live_sandboxes: collections.Counter[str] = collections.Counter()
        self._gone: set[str] = set()

    def sandbox_gone(self, sandbox: str) -> None:
        """The sandbox has exited for good (a gate serving it alone): its connections, and those
        taken from its listeners' queues from now on, have nobody left to answer."""
        self._gone.add(sandbox)
        for conn in self._by_id.values():
            if conn.sandbox_id == sandbox:
                conn.gone = True

    def open(
        self, cid: str, peer: str | None, listener_sandbox: str | None, *, rated: bool = True
    ) -> Connection:
        """Track a new connection; ``refusal`` says which limit, if any, it is over."""
        sandbox = listener_sandbox or self.default_sandbox_id
        conn = self._by_id[cid] = Connection(
            peer=peer,
            sandbox_id=sandbox,
            policy=self.sandbox_policies.get(sandbox) if sandbox else None,
            authenticated=listener_sandbox is not None,
            limit_key=f"sandbox:{sandbox}" if listener_sandbox else f"peer:{_host_of(peer)}",
        )
        if self._gone and sandbox in self._gone:
            conn.gone = True
        self._joined(sandbox)
        self._per_client[conn.limit_key] += 1
        limits = self.limits
        if len(self._by_id) > limits.max_connections:
            conn.refusal = (
                Reason.CONNECTION_LIMIT,
                f"the gate holds its maximum of {limits.max_connections} connections",
            )
        elif self._per_client[conn.limit_key] > limits.max_connections_per_client:
            conn.refusal = (
                Reason.CONNECTION_LIMIT,
                f"more than {limits.max_connections_per_client} concurrent connections from "
                "this client",
            )
        elif rated and not self._rate.allow(conn.limit_key):
            conn.refusal = (
                Reason.RATE_LIMIT,
                f"more than {limits.new_connections_per_second:g} new connections per second "
                f"(burst {limits.new_connections_burst}) from this client",
            )
        return conn

    @property
    def active(self) -> int:
        """Connections open now (over every listener, mitmproxy's included)."""
        return len(self._by_id)

    def get(self, cid: str) -> Connection | None:
        return self._by_id.get(cid)

    def live(self) -> list[Connection]:
        """Every open connection, as a list taken now (closing some while iterating is safe)."""
        return list(self._by_id.values())

    def state_of(self, cid: str, peer: str | None = None) -> Connection:
        """Hooks for a connection that was never seen connecting are tracked from now on."""
        conn = self._by_id.get(cid)
        if conn is None:
            conn = self._by_id[cid] = Connection(peer=peer, sandbox_id=self.default_sandbox_id)
        return conn

    def identified(self, conn: Connection, sandbox_id: str) -> None:
        """A shared gate's client proved its sandbox: from now on its policy applies, and the
        connection counts against the sandbox's cap instead of its address's."""
        if conn.sandbox_id is None:
            conn.sandbox_id = sandbox_id
            self._joined(sandbox_id)
        conn.policy = self.sandbox_policies.get(sandbox_id)
        key = f"sandbox:{sandbox_id}"
        if conn.limit_key != key:
            self._uncount(conn.limit_key)
            conn.limit_key = key
            self._per_client[key] += 1
            if self._per_client[key] > self.limits.max_connections_per_client:
                conn.refusal = (
                    Reason.CONNECTION_LIMIT,
                    f"more than {self.limits.max_connections_per_client} concurrent connections "
                    f"from sandbox {sandbox_id}",
                )

    def close(self, cid: str) -> Connection | None:
        conn = self._by_id.pop(cid, None)
        if conn is None:
            return None
        conn.closed = True
        if conn.limit_key:
            self._uncount(conn.limit_key)
        self._left(conn.sandbox_id)
        return conn

    def _uncount(self, key: str) -> None:
        self._per_client[key] -= 1
        if self._per_client[key] <= 0:
            del self._per_client[key]

    def opened(self, conn: Connection, decision: Decision) -> None:
        """An upstream connection is about to be made under ``decision`` (counted once)."""
        if conn.opened is None:
            conn.opened = decision
            if self.observer is not None:
                self.observer.connection_opened(decision.kind)

    def _joined(self, sandbox_id: str | None) -> None:
        if sandbox_id is not None:
            self._live_sandboxes[sandbox_id] += 1
            self._report_sandboxes()

    def _left(self, sandbox_id: str | None) -> None:
        if sandbox_id is not None and self._live_sandboxes[sandbox_id] > 0:
            self._live_sandboxes[sandbox_id] -= 1
            if not self._live_sandboxes[sandbox_id]:
                del self._live_sandboxes[sandbox_id]
            self._report_sandboxes()

    def _report_sandboxes(self) -> None:
        if self.observer is not None:
            self.observer.active_sandboxes(len(self._live_sandboxes))


def _host_of(peer: str | None) -> str:
    if not peer:
        return "?"
    return peer.rsplit(":", 1)[0]


__all__ = ["MAX_PINS", "Connection", "Connections", "Observer"]
