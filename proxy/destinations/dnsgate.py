"""The DNS gate: the sandbox's only resolver, which answers what the policy allows and leaks nothing else.

DNS is a channel out of the sandbox even when no connection is allowed: ``<data>.attacker.example``
reaches the attacker's name server through any recursive resolver. So a name is decided *before*
anything is sent upstream, and a name the policy does not allow never produces an upstream query.
What each query is answered is :mod:`proxy.destinations.dnsanswer`; this module serves the gate's
listeners, over UDP and TCP, with the sizes, concurrency and rate bounded (threat 13).

The rate is per client address (a token bucket, :class:`proxy.core.limits.RateLimiter`, as for new
connections): a refused question costs the gate no upstream query but still a decision and a record,
so a sandbox sending tens of thousands a second would take the CPU of a shared gate and fill its
journal. A question over the rate is dropped unanswered, before it is parsed, and the client's
drops are recorded as one ``rate-limit`` decision about every RECORD_INTERVAL seconds while they
last, the last ones when the flood stops or the gate closes (a record per dropped question would
be the flood the limit stops).

dnspython, which parses and answers the queries, is imported at the first query in a thread (the loop
keeps serving meanwhile), or at start with :meth:`DnsGate.warm`: ``egress run`` starts a private gate
for every run, and most sandboxes' clients go through the proxy and never query it. A query that
arrives while it is imported waits for it; if the import fails, no query is answered (closed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from proxy.core.limits import DNS_QUERIES_BURST, DNS_QUERIES_PER_SECOND, RateLimiter
from proxy.runtime import sockio
from proxy.runtime.lazy import LazyImport

if TYPE_CHECKING:
    from proxy.destinations.dnsanswer import Answerer
    from proxy.destinations.resolver import Resolver
    from proxy.evidence.emit import Emitter
    from proxy.policy.model import Policy

__all__ = ["SHARED_INFLIGHT_PER_CLIENT", "SHARED_TCP_PER_CLIENT", "DnsGate"]

log = logging.getLogger(__name__)
WARN_INTERVAL = 1.0  # seconds between two warnings about dropped queries
RECORD_INTERVAL = 1.0  # seconds between two records of one client's questions over the rate
MAX_RECORDED_CLIENTS = 10_000  # clients whose last rate-limit record is remembered (then forgotten)

MAX_QUERY = 4096  # octets; real queries are < 300, anything bigger is abuse
# A gate shared by many sandboxes (``egress serve --dns-listen``): what one client address may hold
# of the default in-flight caps (256 questions, 64 TCP connections).
SHARED_INFLIGHT_PER_CLIENT = 64
SHARED_TCP_PER_CLIENT = 16
ANSWERS = LazyImport("proxy.destinations.dnsanswer")


class DnsGate:
    """Answers DNS queries from a sandbox under the current policy.

    ``policy`` is called once per query, so a reloaded policy applies to the next query and one
    query is decided and checked against one consistent snapshot.

    ``max_inflight_per_client`` and ``max_tcp_per_client`` bound what one client address may hold
    of the gate-wide caps (None: no share of its own). A gate that answers many sandboxes (``egress
    serve --dns-listen``) sets them: without them one sandbox that kept 64 TCP connections open, or
    flooded it with questions for names that are slow to resolve, held every slot, and every other
    sandbox's queries were dropped (threat 13).

    ``also``: the other policies a question may be asked under. A DNS question carries no
    credential, so a listener shared by sandboxes with policies of their own (``egress serve
    --sandboxes --dns-listen``) cannot tell which one asks: a name is answered only where every one
    of them allows it, and an address only where every one of them may reach it (else a sandbox
    whose own policy refuses ``*.wide.example`` could still send data upstream in its labels).

    ``queries_per_second`` and ``queries_burst``: the questions one client address may ask (0:
    no limit); see the module docstring.
    """

    def __init__(
        self,
        policy: Callable[[], Policy],
        resolver: Resolver,
        emitter: Emitter,
        sandbox_id: str | None = None,
        *,
        max_inflight: int = 256,
        max_tcp_connections: int = 64,
        tcp_idle_timeout: float = 10.0,
        max_answers: int = 16,
        max_inflight_per_client: int | None = None,
        max_tcp_per_client: int | None = None,
        also: Callable[[], list[Policy]] | None = None,
        queries_per_second: float = DNS_QUERIES_PER_SECOND,
        queries_burst: int = DNS_QUERIES_BURST,
    ) -> None:
        self.policy = policy
        self.also = also
        self.resolver = resolver
        self.emitter = emitter
        self.sandbox_id = sandbox_id
        self.max_inflight = max_inflight
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_answers = max_answers
        self.max_inflight_per_client = max_inflight_per_client
        self.max_tcp_per_client = max_tcp_per_client
        # What each client address holds now, for the per-client caps: (UDP questions, TCP clients)
        self._held: dict[str, list[int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dropped = 0  # datagrams dropped since the last warning said so
        self._warned = float("-inf")  # when (loop time) it last did
        self._tcp_tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._transports: list[asyncio.DatagramTransport] = []
        self._answerer: Answerer | None = None
        self._rate = RateLimiter(queries_per_second, queries_burst)
        self._over: dict[str, tuple[float, int]] = {}  # client -> (last record, dropped since)
        self._rate_warned = float("-inf")
        self._flushing: asyncio.TimerHandle | None = None

    # --- one query -------------------------------------------------------------------------------

    async def handle(self, wire: bytes, client: str, transport: str) -> bytes | None:
        """Answer one query in wire format; None means send nothing (unparseable or not a query,
        or dnspython could not be imported: nothing is answered then)."""
        if len(wire) > MAX_QUERY:
            return None
        answerer = self._answerer
        if answerer is None:
            try:
                module = await ANSWERS.load()
            except Exception:
                log.exception("DNS gate: dnspython could not be imported; no query is answered")
                self._unread(client)
                return None
            answerer = self._answerer = module.Answerer(self)
        return await answerer.handle(wire, client, transport)

    def _unread(self, client: str) -> None:
        """The refusal of a query that could not be read (its parser would not load): recorded
        without a name, so the audit trail shows that queries came and why none was answered."""
        from proxy.core.decision import Kind, Reason, Request
        from proxy.core.engine import refuse

        request = Request(kind=Kind.DNS, host="", client=client, sandbox_id=self.sandbox_id)
        detail = "the DNS gate could not load its DNS parser (dnspython): the query was not read"
        try:
            self.emitter.emit(refuse(request, self.policy(), Reason.DNS_FAILURE, detail))
        except Exception:  # the query stays unanswered either way
            log.exception("DNS gate: the refusal of an unread query could not be recorded")

    @staticmethod
    def warm() -> None:
        """Import dnspython now, in the background (a long-running gate's first query then does
        not wait for it). Needs the running loop."""
        ANSWERS.warm()

    @staticmethod
    async def warmed() -> None:
        """Until :meth:`warm`'s import has ended (imported or failed)."""
        await ANSWERS.settled()

    # --- servers ---------------------------------------------------------------------------------

    async def serve_udp(
        self, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> tuple[str, int]:
        """Answer DNS over UDP on ``sock`` (pre-bound, e.g. inside the sandbox's network namespace)
        or on a new socket bound to ``host:port``. Returns the bound address."""
        if sock is None:
            sock = socket.socket(_family(host), socket.SOCK_DGRAM)
            sock.bind((host, port))
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=sock)
        self._transports.append(transport)
        name = sock.getsockname()
        return name[0], name[1]

    async def serve_tcp(
        self, sock: socket.socket | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> tuple[str, int]:
        """Answer DNS over TCP (RFC 7766 framing, several queries per connection, idle timeout)."""
        if sock is None:
            server = await asyncio.start_server(self._tcp_client, host, port, limit=MAX_QUERY + 2)
        else:
            server = await asyncio.start_server(self._tcp_client, sock=sock, limit=MAX_QUERY + 2)
        self._servers.append(server)
        name = server.sockets[0].getsockname()
        return name[0], name[1]

    def close_tcp_servers(self) -> None:
        """Stop the TCP listeners only (used when the paired UDP port could not be bound)."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    def in_flight(self) -> int:
        """Questions being answered, over UDP and TCP (a TCP client counts once)."""
        return len(self._tasks) + len(self._tcp_tasks)

    def close(self) -> None:
        """Stop accepting and cancel every query in flight; say how many were dropped since the
        last warning said so, and record the questions over the rate no record counted yet."""
        self._flush_over(forget=True)
        if self._dropped:
            log.warning(
                "DNS gate: dropped %d more queries over the in-flight caps before it closed",
                self._dropped,
            )
            self._dropped = 0
        for server in self._servers:
            server.close()
        for transport in self._transports:
            transport.close()
        for task in [*self._tasks, *self._tcp_tasks]:
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = [*self._tasks, *self._tcp_tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._transports.clear()

    def _datagram(self, transport: asyncio.DatagramTransport, wire: bytes, addr: Any) -> None:
        if not self._within_rate(addr):
            return
        if len(self._tasks) >= self.max_inflight or not self._take(addr, 0):
            self._drop(addr)
            return
        task = asyncio.get_running_loop().create_task(self._udp_query(transport, wire, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.max_inflight_per_client is not None:
            task.add_done_callback(lambda _t: self._give_back(addr, 0))

    def _within_rate(self, addr: Any) -> bool:
        """Whether the client at ``addr`` may ask one more question now; when not, the question
        is counted as dropped and, at most every RECORD_INTERVAL, the drops are recorded."""
        client = str(addr[0]) if addr else "unknown"
        if self._rate.allow(client):
            return True
        loop = asyncio.get_running_loop()
        now = loop.time()
        last, dropped = self._over.get(client, (float("-inf"), 0))
        dropped += 1
        if now - last < RECORD_INTERVAL:
            # recorded a moment ago: counted, and recorded by the next flush
            self._over[client] = (last, dropped)
        else:
            if len(self._over) >= MAX_RECORDED_CLIENTS:
                self._flush_over(forget=True)
            self._over[client] = (now, 0)
            self._record_over_rate(client, dropped)
            if now - self._rate_warned >= WARN_INTERVAL:
                log.warning("DNS gate: questions from %s over the rate are dropped", client)
                self._rate_warned = now
        if self._flushing is None:
            self._flushing = loop.call_later(RECORD_INTERVAL, self._flush_over)
        return False

    def _flush_over(self, *, forget: bool = False) -> None:
        """Records what each client dropped since its last record, and forgets the clients with
        nothing left to record (all of them with ``forget``); runs every RECORD_INTERVAL while a
        client is over the rate, so a flood that stops has its last drops recorded too."""
        if self._flushing is not None:  # called early (``forget``): one timer at a time
            self._flushing.cancel()
        self._flushing = None
        if forget:
            over, self._over = self._over, {}
            for client, (_, dropped) in over.items():
                if dropped:
                    self._record_over_rate(client, dropped)
            return
        now = asyncio.get_running_loop().time()
        for client, (last, dropped) in list(self._over.items()):
            if dropped:
                self._record_over_rate(client, dropped)
                self._over[client] = (now, 0)
            elif now - last >= RECORD_INTERVAL:
                del self._over[client]
        if self._over:
            self._flushing = asyncio.get_running_loop().call_later(
                RECORD_INTERVAL, self._flush_over
            )

    def _record_over_rate(self, client: str, dropped: int) -> None:
        from proxy.core.decision import Kind, Reason, Request
        from proxy.core.engine import refuse

        rate = self._rate
        request = Request(kind=Kind.DNS, host="", client=client, sandbox_id=self.sandbox_id)
        detail = (
            f"more than {rate.rate:g} DNS questions a second (burst {rate.burst:g}) from this "
            f"client: {dropped} dropped unanswered since the last such record"
        )
        try:
            self.emitter.emit(refuse(request, self.policy(), Reason.RATE_LIMIT, detail))
        except Exception:  # dropped either way
            log.exception("DNS gate: the record of questions over the rate could not be made")

    def _take(self, addr: Any, which: int) -> bool:
        """Whether the client at ``addr`` may hold one more UDP question (``which`` 0) or TCP
        connection (1) under its per-client cap; counted when it may."""
        cap = self.max_inflight_per_client if which == 0 else self.max_tcp_per_client
        if cap is None:
            return True
        client = str(addr[0]) if addr else "unknown"
        held = self._held.setdefault(client, [0, 0])
        if held[which] >= cap:
            return False
        held[which] += 1
        return True

    def _give_back(self, addr: Any, which: int) -> None:
        client = str(addr[0]) if addr else "unknown"
        held = self._held.get(client)
        if held is None:
            return
        held[which] -= 1
        if held == [0, 0]:
            del self._held[client]

    def _drop(self, addr: Any) -> None:
        """Counts a datagram or TCP client dropped for the in-flight caps; says so at most once a
        second (a sandbox flooding the gate with queries must not flood its log too)."""
        self._dropped += 1
        now = asyncio.get_running_loop().time()
        if now - self._warned >= WARN_INTERVAL:
            log.warning(
                "DNS gate: %d queries in flight, dropped %d (the last from %s) since the last warning",
                self.in_flight(),
                self._dropped,
                addr,
            )
            self._dropped, self._warned = 0, now

    async def _udp_query(
        self, transport: asyncio.DatagramTransport, wire: bytes, addr: Any
    ) -> None:
        reply = await self.handle(wire, str(addr[0]), "udp")
        if reply is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        if (
            task is None
            or len(self._tcp_tasks) >= self.max_tcp_connections
            or not self._take(peer, 1)
        ):
            self._drop(peer)
            writer.close()
            return
        self._tcp_tasks.add(task)
        client = str(peer[0]) if peer else "unknown"
        served = 0
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout)
                size = int.from_bytes(header, "big")
                if size == 0 or size > MAX_QUERY:
                    break
                wire = await asyncio.wait_for(reader.readexactly(size), self.tcp_idle_timeout)
                if not self._within_rate(peer):
                    break  # over the rate: closed, the rest of its questions unread
                reply = await self.handle(wire, client, "tcp")
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await asyncio.wait_for(writer.drain(), self.tcp_idle_timeout)
                # Buffered queries are read without a wait, and a refusal waits for no upstream:
                # a turn for the gate's other clients every few (one connection's pipelined
                # queries held every sandbox of a shared gate for seconds).
                await sockio.take_turns(served)
                served += 1
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            if self.max_tcp_per_client is not None:
                self._give_back(peer, 1)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, gate: DnsGate) -> None:
        self._gate = gate
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is a datagram transport without subclassing asyncio's
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self._transport is not None:
            self._gate._datagram(self._transport, data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS gate UDP error: %s", exc)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
