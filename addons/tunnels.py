"""CONNECT tunnels that end in a passthrough relay, served without mitmproxy's layers.

Most of what a sandbox does is a CONNECT to a registry or source host, a TLS ClientHello, and bytes
relayed untouched. mitmproxy spends ~3 ms of CPU on such a tunnel (a connection handler, an HTTP layer,
a dozen hook dispatches, a TCP layer with an event per chunk); this front end spends a fraction of that.
It makes exactly the checkpoint calls the mitmproxy adapter makes, in the same order, and enforces the
answers the same way: :meth:`Checkpoint.connected` at accept (the per-client cap), ``admit`` for the
CONNECT (identity, policy, destination, self, audit, pin), ``admit_tunnel`` for the first bytes (the core
classifier and the SNI check), ``dial_target`` before the only upstream connect, and ``disconnected``
with the byte counts once both sides are closed.

Which connections it takes is decided from a peek at the first bytes, before anything is consumed: a
complete ``CONNECT host:port`` request line to a port whose tunnel is not plain HTTP, to a host whose
requests no rule reads. Everything else (plain-HTTP requests, tunnels to port 80 whose requests are
decided one by one, tunnels the gate inspects, anything unusual) is handed to mitmproxy untouched, with
the time already spent counted against its request deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from addons.clientsend import send_to_client
from addons.plainhttp import KEEPALIVE_IDLE, Outcome, PlainHttp, read_head
from addons.refusal import refusal_bytes
from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Kind, Reason, Request
from proxy.core.fieldlines import CONTROL_RE, TOKEN_RE
from proxy.core.firstbytes import (
    MAX_CLIENT_HELLO,
    PLAIN_HTTP_PORT,
    FirstBytes,
    Protocol,
    classify,
)
from proxy.core.framing import MAX_REQUEST_HEAD, Problem, head_problem
from proxy.core.helloretry import asks_again, second_hello
from proxy.core.hosts import InvalidHost, split_authority
from proxy.runtime import sockio
from proxy.runtime.splice import CHUNK, relay

log = logging.getLogger(__name__)

# Set by the listener that accepted a connection (a per-sandbox socket), read once in client_connected.
current_sandbox: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "egress_sandbox", default=None
)
# When the connection was accepted (time.monotonic()), if before mitmproxy saw it: the request
# deadline counts from then, not from when mitmproxy took it over.
accepted_at: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "egress_accepted_at", default=None
)
# The front end's record of that connection (its lookup as it opened), read in client_connected.
handed_over: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "egress_handed_over", default=None
)

PEEK = 4096
CONNECT_PREFIX = b"CONNECT "
CONNECT_TIMEOUT = 30.0
MAX_REFUSALS_PER_CONNECTION = 100_000  # bounds the loop; each refusal is decided and recorded
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)

# Hands a connection the front end does not take to mitmproxy: (socket, sandbox id, accepted at,
# the front end's record of the connection).
Handoff = Callable[[socket.socket, str | None, float, Connection], Awaitable[None]]


def connect_target(head: bytes) -> tuple[str, int] | None:
    """(host, port) of a peeked request that starts with a complete CONNECT line to a non-HTTP
    port, else None."""
    if not head.startswith(CONNECT_PREFIX):
        return None
    line, sep, _ = head.partition(b"\r\n")
    if not sep:
        return None
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    try:
        host, port = split_authority(parts[1].decode("ascii"), -1, bare_ipv6=False)
    except (InvalidHost, UnicodeDecodeError):
        return None
    if port < 1 or port == PLAIN_HTTP_PORT:
        return None
    return host.strip("[]"), port


class _Closed(Exception):
    """The client went away or broke the protocol; nothing more to answer."""


class TunnelFrontEnd:
    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        request_deadline: float,
        handoff: Handoff,
        idle_timeout: float = 0.0,
        plain: PlainHttp | None = None,
    ):
        self.checkpoint = checkpoint
        self.request_deadline = request_deadline
        self.idle_timeout = idle_timeout
        self.handoff = handoff
        self.plain = plain  # serves the plain-HTTP requests it can serve exactly as mitmproxy would
        self._ids = itertools.count(1)
        self.tunnels = 0  # taken by this front end (tests read it)
        self.handed = 0  # handed to mitmproxy's layers (tests read it)
        # Connections being served, from every listener: a draining gate waits for them after its
        # listeners are closed, instead of cutting them off.
        self.active: set[asyncio.Task[None]] = set()
        self.draining = False
        self.on_first_connection: Callable[[], None] | None = None
        self._listening: dict[socket.socket, sockio.Watch] = {}

    async def serve(self, listener: socket.socket, sandbox_id: str | None) -> None:
        """Accept on ``listener`` until it is closed (after :meth:`stop_serving`). The listener
        stays registered with the loop between connections (a :class:`sockio.Watch`)."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        tasks: set[asyncio.Task[None]] = set()
        watch = self._listening[listener] = sockio.Watch(listener)
        try:
            while True:
                # Level-triggered: with more connections queued, the wait returns at once (one
                # accept per wake-up, and no accept that only says "none left").
                await watch.readable()
                try:
                    conn, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue  # a stale wake-up
                except OSError:
                    if listener.fileno() < 0:
                        return
                    await asyncio.sleep(0.05)  # EMFILE and friends: back off, keep serving
                    continue
                if self.on_first_connection is not None:
                    first, self.on_first_connection = self.on_first_connection, None
                    first()
                # Started at once, up to its first wait: its request is usually here already, and
                # a turn of the loop per connection is what a denial's answer would wait for (as
                # every task is once mitmproxy's layers have started: they set an eager factory).
                task = asyncio.Task(
                    self._connection(conn, sandbox_id, peer), loop=loop, eager_start=True
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.active.add(task)
                task.add_done_callback(self.active.discard)
        finally:
            self.stop_serving(listener)
            if not self.draining:  # a sandbox that ended: its connections end with it
                for task in list(tasks):
                    task.cancel()

    def stop_serving(self, listener: socket.socket) -> None:
        """Unregister ``listener`` from the loop: before it is closed (its descriptor's number may
        be the next socket's), and again, harmlessly, as its accept loop ends."""
        watch = self._listening.pop(listener, None)
        if watch is not None:
            watch.close()

    def cancel_all(self) -> int:
        """End every connection still being served (a drain's deadline passed); how many."""
        tasks = list(self.active)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def _connection(
        self, sock: socket.socket, sandbox_id: str | None, peer: tuple[Any, ...]
    ) -> None:
        """One accepted connection; ``peer``, its address as ``accept`` gave it (no getpeername).
        TCP_NODELAY is set here, not inherited from the listener: a connection queued before the
        listener was served was cloned from it as it was then."""
        accepted = time.monotonic()
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = f"t{next(self._ids)}"
        conn, refusal = self.checkpoint.connected(cid, f"{peer[0]}:{peer[1]}", sandbox_id)
        if refusal is not None:
            self.checkpoint.disconnected(cid)
            sock.close()
            return
        handed = False
        watch = sockio.Watch(sock)  # one registration for every wait on the client
        try:
            head = await self._peek(sock, conn, accepted, watch)
            if head is None:
                return
            target = connect_target(head)
            plain = read_head(head) if target is None and self.plain is not None else None
            if plain is not None and self.plain is not None and self.plain.takes(conn, plain):
                outcome, accepted = await self.plain.serve(sock, conn, plain, accepted, watch)
                if outcome is Outcome.DONE:
                    return
                target = None  # the next request is mitmproxy's; nothing of it was consumed
            if target is None or self.checkpoint.may_inspect(conn, *target):
                # mitmproxy counts this connection itself from here on
                self.checkpoint.disconnected(cid)
                cid = ""
                handed = True
                self.handed += 1
                watch.close()  # mitmproxy's transport reads the socket from here on
                await self.handoff(sock, sandbox_id, accepted, conn)
                return
            self.tunnels += 1
            await self._tunnel(sock, conn, accepted, watch)
        except (_Closed, OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            watch.close()
            if cid:
                self.checkpoint.disconnected(cid)
            if not handed:
                sock.close()

    def _not_here(self, conn: Connection, host: str, port: int) -> Problem | None:
        """A later CONNECT on a connection taken here whose requests must be read one by one (port
        80, or a host the gate inspects): only mitmproxy's layers do that, so it is refused before
        anything is looked up or recorded as allowed; the client can open a new connection."""
        if port != PLAIN_HTTP_PORT and not self.checkpoint.may_inspect(conn, host, port):
            return None
        return Reason.UNSUPPORTED, (
            "a tunnel whose requests the gate reads must be the first request on its connection; "
            "open a new connection for it"
        )

    def _remaining(self, since: float) -> float | None:
        if self.request_deadline <= 0:
            return None
        return max(0.0, self.request_deadline - (time.monotonic() - since))

    def _timed_out(self, conn: Connection) -> _Closed:
        self.checkpoint.refuse_connection(
            conn,
            Reason.REQUEST_TIMEOUT,
            f"no complete request within {self.request_deadline:g} s; the connection was closed",
        )
        return _Closed()

    async def _peek(
        self, sock: socket.socket, conn: Connection, since: float, watch: sockio.Watch
    ) -> bytes | None:
        """The first bytes, not consumed; None when the client closed first. A request line that
        arrives in pieces is mitmproxy's (waiting here for the rest would mean polling a socket
        that stays readable: a slow client could make the gate spin)."""
        try:
            first = await sockio.recv(
                sock, PEEK, timeout=self._remaining(since), watch=watch, flags=socket.MSG_PEEK
            )
        except TimeoutError:
            raise self._timed_out(conn) from None
        return first or None

    async def _tunnel(
        self, sock: socket.socket, conn: Connection, since: float, watch: sockio.Watch
    ) -> None:
        buffered = b""
        for refused in range(MAX_REFUSALS_PER_CONNECTION):
            head, buffered = await self._head(sock, conn, buffered, since, watch)
            parsed = _parse_connect(head)
            if parsed is None:
                self.checkpoint.refuse_connection(
                    conn, Reason.BAD_REQUEST, "malformed CONNECT head"
                )
                await self._send(sock, conn, BAD_REQUEST)
                raise _Closed()
            host, port, credential, fields = parsed
            request = Request(Kind.CONNECT, host, port, "CONNECT")
            problem = head_problem("CONNECT", f"{host}:{port}", fields) or self._not_here(
                conn, host, port
            )
            # The checkpoint may answer an admitted tunnel before its record is written (its
            # process is looked up while the client prepares its first bytes): told here.
            answered: list[bool] = []
            answer = functools.partial(self._established, sock, conn, answered)
            decision = await self.checkpoint.admit(
                conn, request, credential=credential, problem=problem, answer=answer
            )
            if answered and not (answered[0] and decision.allowed):
                raise _Closed()  # the client went, or the record refused it: nothing was dialled
            if decision.allowed and conn.inspected:
                # Its requests must be read, which only mitmproxy's layers do; the policy changed
                # between the peek and the decision. Never relay it raw.
                raise _Closed()
            if decision.allowed:
                break
            # As on the mitmproxy path, the connection stays open for the client's next request.
            await self._send(sock, conn, refusal_bytes(decision, close=False))
            await sockio.take_turns(refused)
            since = time.monotonic()
        else:
            raise _Closed()
        self.checkpoint.opened(conn, decision)
        # Admitted from here on: a recheck after a reload may end it while its first bytes come
        # (it then clears the closer, and nothing is dialled or sent).
        conn.closer = functools.partial(_shut, sock)
        if not answered:
            await self._send(sock, conn, ESTABLISHED)
        first, classified = await self._first_bytes(sock, conn, port, buffered, watch)
        tunnel = conn.tunnel
        if classified.protocol is Protocol.HTTP:
            raise _Closed()  # never relayed raw (see above); unreachable while port 80 is refused
        verdict = self.checkpoint.admit_tunnel(conn, classified)
        if tunnel is None or (verdict is not None and not verdict.allowed) or conn.closer is None:
            raise _Closed()
        target = self.checkpoint.dial_target(conn, tunnel.host, port)
        if target is None:
            log.error("refused to dial %s:%s: not checked by the gate", tunnel.host, port)
            raise _Closed()
        up = socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET)
        up_watch: sockio.Watch | None = None
        try:
            up.setblocking(False)
            # One registration for the connect's wait (if any), the server's hello and the
            # relay's reader.
            up_watch = sockio.Watch(up)
            await sockio.connect(up, (target, port), timeout=CONNECT_TIMEOUT, watch=up_watch)
            if conn.closer is None:  # closed by a recheck while it was dialled
                raise _Closed()
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.closer = functools.partial(_shut, sock, up)
            if classified.protocol is Protocol.TLS:
                # Only the ClientHello goes before the server has answered it (proxy.core.helloretry).
                hello, rest = first[: classified.size], first[classified.size :]
                await sockio.send_all(up, hello)
                conn.bytes_out += len(hello)
                first = await self._second_hello(sock, up, conn, port, rest, watch, up_watch)
            if first:
                await sockio.send_all(up, first)
                conn.bytes_out += len(first)
            await self._relay(sock, up, conn, watch, up_watch)
        finally:
            if up_watch is not None:
                up_watch.close()
            up.close()

    async def _second_hello(
        self,
        sock: socket.socket,
        up: socket.socket,
        conn: Connection,
        port: int,
        held: bytes,
        watch: sockio.Watch,
        up_watch: sockio.Watch,
    ) -> bytes:
        """The server's first bytes go to the client; the client's bytes after its ClientHello wait
        until they show whether the server asks for a second ClientHello, which is then decided
        as the first was. Returns the client bytes to send on (the second hello included)."""
        stall = self.idle_timeout if self.idle_timeout > 0 else KEEPALIVE_IDLE
        reply = b""
        while (retry := asks_again(reply)) is None:
            more = await sockio.recv(up, CHUNK, timeout=stall, watch=up_watch)
            if not more:
                raise _Closed()  # the server ended it before answering
            reply += more
        conn.bytes_in += len(reply)
        await self._send(sock, conn, reply)
        if not retry:
            return held
        held, second = await self._first_bytes(sock, conn, port, held, watch, second_hello)
        verdict = self.checkpoint.admit_tunnel(conn, second)
        if (verdict is not None and not verdict.allowed) or conn.closer is None:
            raise _Closed()
        return held

    async def _relay(
        self,
        sock: socket.socket,
        up: socket.socket,
        conn: Connection,
        watch: sockio.Watch,
        up_watch: sockio.Watch,
    ) -> None:
        """Relay until both sides end, or until the tunnel has moved no byte either way for the
        idle timeout: then it is closed and the closing recorded (``idle-timeout``). The idle
        check is a timer on the loop, not a task beside the relay (one task per tunnel)."""
        if self.idle_timeout <= 0:
            await _relay(sock, up, conn, watch, up_watch)
            return
        loop = asyncio.get_running_loop()
        moved = conn.bytes_in + conn.bytes_out
        timer: asyncio.TimerHandle

        def check() -> None:
            nonlocal moved, timer
            now = conn.bytes_in + conn.bytes_out
            if now != moved:
                moved = now
                timer = loop.call_later(self.idle_timeout, check)
                return
            try:
                self.checkpoint.refuse_connection(
                    conn,
                    Reason.IDLE_TIMEOUT,
                    f"no byte either way for {self.idle_timeout:g} s; the tunnel was closed",
                )
            finally:  # closed even when the record fails (the loop's handler logs the error)
                _shut(sock, up)  # both directions read their end: the relay returns

        timer = loop.call_later(self.idle_timeout, check)
        try:
            await _relay(sock, up, conn, watch, up_watch)
        finally:
            timer.cancel()

    async def _head(
        self,
        sock: socket.socket,
        conn: Connection,
        buffered: bytes,
        since: float,
        watch: sockio.Watch,
    ) -> tuple[bytes, bytes]:
        """One request head and what followed it, within the deadline and MAX_REQUEST_HEAD."""
        while (end := buffered.find(b"\r\n\r\n")) < 0:
            if len(buffered) > MAX_REQUEST_HEAD:
                await self._too_large(sock, conn)
            buffered += await self._recv(sock, conn, PEEK, since, watch)
        if end + 4 > MAX_REQUEST_HEAD:
            await self._too_large(sock, conn)
        return buffered[: end + 4], buffered[end + 4 :]

    async def _established(
        self, sock: socket.socket, conn: Connection, answered: list[bool]
    ) -> None:
        """An admitted tunnel's ``200``, when the checkpoint sends it; ``answered`` says whether it
        was sent (the client may have gone)."""
        try:
            await self._send(sock, conn, ESTABLISHED)
        except (_Closed, OSError):
            answered.append(False)
        else:
            answered.append(True)

    async def _send(self, sock: socket.socket, conn: Connection, data: bytes) -> None:
        """To the client. Refused requests keep the connection open, so a client can pipeline them
        and never read a refusal: a client that takes no byte for the idle timeout (600 s if that
        is 0) is closed and the closing recorded, instead of holding its connection for ever."""
        stall = self.idle_timeout if self.idle_timeout > 0 else KEEPALIVE_IDLE
        if not await send_to_client(self.checkpoint, conn, sock, data, stall=stall):
            raise _Closed()

    async def _too_large(self, sock: socket.socket, conn: Connection) -> None:
        detail = f"the request head is larger than {MAX_REQUEST_HEAD} bytes"
        self.checkpoint.refuse_connection(conn, Reason.HEAD_TOO_LARGE, detail)
        await self._send(sock, conn, HEAD_TOO_LARGE)
        raise _Closed()

    async def _first_bytes(
        self,
        sock: socket.socket,
        conn: Connection,
        port: int,
        data: bytes,
        watch: sockio.Watch,
        read: Callable[[int, bytes | bytearray], FirstBytes] = classify,
    ) -> tuple[bytes, FirstBytes]:
        """Read until the classifier (``read``: the first hello's, or the second's after a
        HelloRetryRequest) has an answer (bounded by its own caps and the deadline); the bytes
        and that answer."""
        started = time.monotonic()
        buffer: bytes | bytearray = data
        while (classified := read(port, buffer)).protocol is Protocol.WAIT:
            if len(buffer) > MAX_CLIENT_HELLO + 64 * 1024:  # classify refuses long before this
                raise _Closed()
            buffer = _growable(buffer)
            buffer += await self._recv(sock, conn, CHUNK, started, watch)
        return bytes(buffer), classified

    async def _recv(
        self, sock: socket.socket, conn: Connection, size: int, since: float, watch: sockio.Watch
    ) -> bytes:
        """What the client sends next, before its deadline (counted from ``since``) passes."""
        try:
            more = await sockio.recv(sock, size, timeout=self._remaining(since), watch=watch)
        except TimeoutError:
            raise self._timed_out(conn) from None
        if not more:
            raise _Closed()
        return more


def _parse_connect(
    head: bytes,
) -> tuple[str, int, str | None, list[tuple[bytes, bytes]]] | None:
    """(host, port, Proxy-Authorization, header fields) from a CONNECT request head, or None when it
    is malformed:
    ``CONNECT authority HTTP/1.x``, header lines ``token: value`` without control characters or
    folding, and an authority with a port read by the one HOST:PORT parser. The host itself is
    checked by the policy (an invalid one is refused and recorded like any other)."""
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-1] or lines[-2]:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    credential: str | None = None
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:-2]:
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if not sep or not TOKEN_RE.fullmatch(name) or CONTROL_RE.search(value):
            return None
        fields.append((name, value))
        if credential is None and name.lower() == b"proxy-authorization":
            credential = value.decode("latin-1")
    try:
        host, port = split_authority(parts[1].decode("ascii"), -1, bare_ipv6=False)
    except (InvalidHost, UnicodeDecodeError):
        return None
    if port < 1:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port, credential, fields


def _shut(*socks: socket.socket) -> None:
    """End a relayed tunnel from outside (a reload no longer allows it): both splices see EOF."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _relay(
    client: socket.socket,
    upstream: socket.socket,
    conn: Connection,
    watch: sockio.Watch,
    up_watch: sockio.Watch,
) -> Awaitable[None]:
    """Both directions relayed by the kernel until both have ended, counted on the connection;
    the relay's readers take over the registrations of the sockets' watches."""

    def outbound(n: int) -> None:
        conn.bytes_out += n

    def inbound(n: int) -> None:
        conn.bytes_in += n

    return relay(client, upstream, outbound, inbound, client_watch=watch, upstream_watch=up_watch)


def _growable(buffer: bytes | bytearray) -> bytearray:
    """The buffer a hello that has not all come yet is grown in, in place: a hello sent byte by
    byte costs linear time. A hello read whole (the usual case) is classified as it came, uncopied."""
    return buffer if isinstance(buffer, bytearray) else bytearray(buffer)
