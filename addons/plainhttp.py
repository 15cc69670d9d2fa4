"""Plain-HTTP proxy requests served by the gate's front end, without mitmproxy's layers.

A package manager fetching metadata over plain HTTP sends many small GETs over one kept-alive
connection; mitmproxy spends most of each one in its layer and hook machinery and one send per event.
This path serves only the requests it can serve exactly as the mitmproxy adapter would, and hands
everything else to mitmproxy untouched.

Which requests: decided per request from a peek at a complete request head, before any byte of it is
consumed (:func:`read_head`): ``GET`` or ``HEAD`` with an absolute-form ``http://`` URL of a plain host
name or dotted IPv4 address, ``HTTP/1.1``, one ``Host`` header, no body and nothing that announces
one (``Content-Length``, ``Transfer-Encoding``), no ``Upgrade``/``Expect``, ``Connection`` only
``keep-alive``/``close``, printable ASCII only, every line ended by CRLF, no folding, the whole head in
one peek. The connection's policy may not read requests on that host (no request rules) and no
credential may be issued (the placeholder step needs mitmproxy's flows). Anything else, at a request
boundary, goes to mitmproxy with nothing consumed, which is what serves it today.

Each request makes the checkpoint calls :class:`addons.gate.GateAddon` makes for a plain request, from
the same reading of the head (:mod:`proxy.core.httpheads`): the gate's own ``X-Egress-*`` headers are
dropped, ``Proxy-Authorization`` is taken for the identity step, the framing step compares the
``Host`` header with the URL, and the answer is enforced the same way: a refusal is the same response
(and the connection stays open, as there), an allow is counted as opened and dialled only through
:meth:`Checkpoint.dial_target`. One upstream connection is kept per client connection while the
host, port and pinned address stay the same.

A plain response head with a stated length or no body is framed by
:func:`proxy.core.responseframing.read_response_head` (exactly as h11 would frame it) and its body
counted through. Every other response is read with h11 (a strict sans-IO parser) after checks h11
leaves out, on the raw head (the narrow reader's grammar is stricter than they are): a bare LF or
CR, a folded line, two ``Content-Length`` fields or a length and a transfer coding together close
both connections (fail closed). Any byte past the end of a response closes both connections: a
request boundary is never guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import re
import select
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from addons.clientsend import send_to_client
from addons.refusal import refusal_bytes
from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.credentials import Carried
from proxy.core.decision import Kind, Reason, Request
from proxy.core.fieldlines import FIELD_LINES
from proxy.core.frozen import fast_init
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.core.httpheads import http_request, is_egress_header, plain_problem
from proxy.core.responseframing import read_response_head
from proxy.core.switching import switch_problem
from proxy.runtime import sockio

if TYPE_CHECKING:
    import h11

log = logging.getLogger(__name__)

PEEK = 16 * 1024  # a head longer than this is mitmproxy's
MAX_RESPONSE_HEAD = 64 * 1024
KEEPALIVE_IDLE = 600.0  # no request on a kept-alive connection: as mitmproxy's tcp_timeout
UPSTREAM_TIMEOUT = 600.0  # no byte from the upstream while a response is due (as mitmproxy's)
CONNECT_TIMEOUT = 30.0
MAX_REQUESTS = 1_000_000  # per connection; bounds the loop
CHUNK = 256 * 1024
# h11 events (a one-byte chunk is one) handled back to back before other connections are served
EVENTS_PER_TURN = 256
# informational (1xx) responses passed on before a request's final one: servers send one or two
# (100 Continue, 103 Early Hints); an upstream sending them without end is closed
MAX_INFORMATIONAL = 32
METHODS = frozenset({b"GET", b"HEAD"})
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

_URL = re.compile(
    rb"http://(?P<host>[A-Za-z0-9.\-]+)(?::(?P<port>[1-9][0-9]{0,4}))?"
    rb"(?P<path>/[A-Za-z0-9\-._~!$&'()*+,=:@/%]*)(?:\?(?P<query>[A-Za-z0-9\-._~!$&'()*+,;=:@/%?]+))?"
)
# Fields that announce a body or another protocol, or that only mitmproxy's flows handle.
_NOT_HERE = frozenset(
    {b"content-length", b"transfer-encoding", b"upgrade", b"expect", b"http2-settings"}
)
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding)[ \t]*:")
# a 101 status line, as h11 reads one (its reason phrase is optional)
_SWITCH = re.compile(rb"HTTP/[0-9]\.[0-9] 101(?: |\r\n)")
_CONNECTION_TOKENS = frozenset({"close", "keep-alive"})


@fast_init
@dataclass(frozen=True, slots=True)
class PlainHead:
    """A request head this path serves, as mitmproxy would have parsed it."""

    size: int  # bytes, up to and including the blank line
    method: str
    host: str  # the URL's host, in its canonical spelling (lower-case)
    port: int
    target: str  # origin-form, what the upstream is sent
    fields: tuple[tuple[bytes, bytes], ...]  # without X-Egress-* and Proxy-Authorization
    credential: str | None  # Proxy-Authorization, for the identity step
    close: bool  # the client asked to close after this request
    host_header: str  # the one Host header's value, for the framing step


def read_head(data: bytes) -> PlainHead | None:
    """The request head at the start of ``data`` if this path can serve it, else None (mitmproxy's:
    its parser, its refusals). Deliberately narrow: anything unusual is None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    line_end = data.find(b"\r\n")
    # every field line at once: a token, a colon, printable ASCII or tabs, CRLF (no folding, no
    # space before the colon, no control byte, no bare CR or LF)
    if not FIELD_LINES.fullmatch(data, line_end + 2, end + 2):
        return None
    parts = data[:line_end].split(b" ")
    if len(parts) != 3 or parts[0] not in METHODS or parts[2] != b"HTTP/1.1":
        return None
    url = _URL.fullmatch(parts[1])
    if url is None:
        return None
    raw_host, raw_port, path, query = url.group("host", "port", "path", "query")
    if b"//" in path or b";" in path:
        return None
    host = raw_host.decode("ascii")
    port = int(raw_port) if raw_port else 80
    if port > 65535 or not _plain_host(host):
        return None
    target = path + b"?" + query if query else path
    fields: list[tuple[bytes, bytes]] = []
    credential: str | None = None
    hosts: list[bytes] = []
    close = False
    for line in data[line_end + 2 : end].split(b"\r\n") if end > line_end else ():
        name, _, value = line.partition(b":")
        value = value.strip(b" \t")
        key = name.lower()
        if key in _NOT_HERE:
            return None
        if key == b"host":
            hosts.append(value)
        elif key == b"connection":
            tokens = {t.strip().lower() for t in value.decode("ascii").split(",")}
            if not tokens <= _CONNECTION_TOKENS:
                return None
            close = close or "close" in tokens
        elif key == b"proxy-authorization":
            if credential is not None:
                return None
            credential = value.decode("ascii")
            continue
        if key[:1] == b"x" and is_egress_header(name.decode("ascii")):
            continue
        fields.append((name, value))
    if len(hosts) != 1:
        return None
    return PlainHead(
        end + 4,
        parts[0].decode("ascii"),
        host,
        port,
        target.decode("ascii"),
        tuple(fields),
        credential,
        close,
        hosts[0].decode("ascii"),
    )


@functools.lru_cache(maxsize=4096)
def _plain_host(host: str) -> bool:
    """A host name or dotted IPv4 address in its canonical spelling; every other spelling (numeric
    tricks, trailing dots, empty labels) is mitmproxy's to parse."""
    try:
        name = canonical_host(host)
    except InvalidHost:
        return False
    return str(name) == host


def response_head_problem(head: bytes) -> str | None:
    """What makes a response head - or the start of one, still incomplete - ambiguous where h11
    would accept it; None if it is clean so far. Read on the raw bytes: h11 merges repeated
    ``Content-Length`` fields before anyone sees them."""
    head = head.removesuffix(b"\r")
    lone = head.replace(b"\r\n", b"")
    if b"\n" in lone or b"\r" in lone:
        return "a bare LF or CR in the response head"
    if b"\r\n " in head or b"\r\n\t" in head:
        return "a folded line in the response head"
    if b"\x00" in head:
        return "a NUL byte in the response head"
    framing = _FRAMING.findall(head.lower())
    lengths = framing.count(b"content-length")
    if lengths > 1:
        return "more than one Content-Length in the response"
    if lengths and b"transfer-encoding" in framing:
        return "both Content-Length and Transfer-Encoding in the response"
    return None


class Outcome(enum.Enum):
    DONE = "done"  # the connection ended (closed by either side, or refused)
    HANDOFF = "handoff"  # the next request is mitmproxy's; nothing of it was consumed


class _Closed(Exception):
    """End the client connection (a peer went away, or something was ambiguous)."""


class _Upstream:
    """One upstream connection, and whether it may carry the next request."""

    def __init__(self, sock: socket.socket, key: tuple[str, int, str]) -> None:
        self.sock = sock
        self.watch = sockio.Watch(sock)  # one registration for every response read
        self.key = key
        self.idle = True  # no exchange under way, and every one so far left it open
        # Asked before every reuse whether anything (bytes, an end, an error) is waiting: without
        # the failed read and its exception that a peek at an empty socket costs.
        self.waiting = select.poll()
        self.waiting.register(sock, select.POLLIN)

    def reusable(self, key: tuple[str, int, str]) -> bool:
        """Same destination, the last exchange complete, and nothing unasked-for waiting."""
        if key != self.key or not self.idle:
            return False
        if not self.waiting.poll(0):  # nothing to read, no end, no error
            return True
        try:
            waiting = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if waiting:
            log.warning("upstream %s:%s sent bytes nobody asked for; not reused", key[2], key[1])
        return False

    async def recv(self) -> bytes:
        return await sockio.recv(self.sock, CHUNK, timeout=UPSTREAM_TIMEOUT, watch=self.watch)

    def close(self) -> None:
        self.watch.close()
        self.sock.close()


class PlainHttp:
    """Serves the eligible plain-HTTP requests of one front end's connections."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        idle_timeout: float,
        query_values: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.keepalive_idle = idle_timeout if idle_timeout > 0 else KEEPALIVE_IDLE
        self.query_values = query_values
        self.decided = 0  # requests decided here (tests read it)
        self.served = 0  # of which sent upstream

    def takes(self, conn: Connection, head: PlainHead) -> bool:
        """Whether this path may decide ``head`` on ``conn``: no request rules could read it and no
        credential is issued (both may change with a reload: asked at every request)."""
        if self.checkpoint.credentials is not None:
            declared = self.checkpoint.credentials()
            if declared is not None and declared.issued:
                return False
        return not self.checkpoint.may_inspect(conn, head.host, head.port)

    async def serve(
        self,
        sock: socket.socket,
        conn: Connection,
        first: PlainHead,
        accepted: float,
        watch: sockio.Watch,
    ) -> tuple[Outcome, float]:
        """Serve requests from ``first`` on until the connection ends or a request is not this
        path's; then (HANDOFF, when its first byte was seen) for mitmproxy's deadline. ``watch``
        is the client socket's, kept by the caller."""
        upstream: _Upstream | None = None
        head: PlainHead | None = first
        since = accepted
        try:
            for served in range(MAX_REQUESTS):
                if head is None:
                    since, data = await self._next(sock, conn, watch)
                    if not data:
                        return Outcome.DONE, since
                    head = read_head(data)
                    if head is None or not self.takes(conn, head):
                        if self._identified(conn):
                            # One connection, one identity: mitmproxy would count it as new.
                            return Outcome.DONE, since
                        return Outcome.HANDOFF, since
                await _consume(sock, head.size, watch)
                upstream, keep = await self._request(sock, conn, head, upstream)
                if not keep:
                    return Outcome.DONE, since
                head = None
                await sockio.take_turns(served)
            return Outcome.DONE, since
        except (_Closed, OSError, TimeoutError):
            return Outcome.DONE, since
        finally:
            if upstream is not None:
                upstream.close()

    def _identified(self, conn: Connection) -> bool:
        return (
            self.checkpoint.identities is not None
            and conn.sandbox_id is not None
            and not conn.authenticated
        )

    async def _next(
        self, sock: socket.socket, conn: Connection, watch: sockio.Watch
    ) -> tuple[float, bytes]:
        """(when the next request's first byte came, a peek at it); b"" when the client closed.
        A connection idle past the keep-alive limit is closed and the closing recorded."""
        watch.to_loop()  # a kept-alive connection: waited on once a request from here on
        try:  # a request already there (pipelined, or quick) is taken without a timer
            data = await sockio.recv(
                sock, PEEK, timeout=self.keepalive_idle, watch=watch, flags=socket.MSG_PEEK
            )
        except TimeoutError:
            self.checkpoint.refuse_connection(
                conn,
                Reason.IDLE_TIMEOUT,
                f"no request for {self.keepalive_idle:g} s on a kept-alive connection; closed",
            )
            raise _Closed() from None
        return time.monotonic(), data

    async def _request(
        self, sock: socket.socket, conn: Connection, head: PlainHead, upstream: _Upstream | None
    ) -> tuple[_Upstream | None, bool]:
        """Decide and serve one request whose head was consumed; (upstream kept, keep the client)."""
        request = http_request(
            Kind.HTTP,
            head.host,
            head.port,
            head.method,
            head.target,
            head.fields,
            query_values=self.query_values,
        )
        problem = plain_problem(
            head.method,
            head.target,
            "http",
            head.host,
            head.port,
            head.fields,
            [head.host_header],
        )
        carried = None
        if self.checkpoint.credentials is not None:
            # Only heads without issued credentials get here, but a reload may issue one while
            # this request is decided: the credential step then still sees every placeholder.
            carried = Carried(
                tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.fields),
                head.target,
            )
        decision = await self.checkpoint.admit(
            conn, request, credential=head.credential, problem=problem, carried=carried
        )
        self.decided += 1
        if not decision.allowed:
            refusal = refusal_bytes(decision, close=False)
            if head.method == "HEAD":  # a response to HEAD has no body (docs/plain-http.md)
                refusal = refusal[: refusal.index(b"\r\n\r\n") + 4]
            await self._send(sock, conn, refusal)
            return upstream, not head.close
        if conn.inspected or decision.credential:
            # Never on this path (no tunnel; no credential is added outside an inspected one);
            # were it otherwise, only mitmproxy's flows could apply it: fail closed.
            raise _Closed()
        self.checkpoint.opened(conn, decision)
        target = self.checkpoint.dial_target(conn, head.host, head.port)
        if target is None:
            log.error("refused to dial %s:%s: not checked by the gate", head.host, head.port)
            raise _Closed()
        key = (head.host, head.port, target)
        if upstream is not None:
            if upstream.reusable(key):
                upstream.watch.to_loop()  # kept: waited on once a request from here on
            else:
                upstream.close()
                upstream = None
        if upstream is None:
            upstream = await _dial(sock, target, head.port, key, self.keepalive_idle)
        self.served += 1
        try:
            keep = await self._exchange(sock, conn, head, upstream, request)
        except BaseException:
            # Closed here, whoever dialled it: one dialled for this request is known to no caller,
            # and a socket left to the collector would close with the loop still watching its
            # descriptor, whose number the next socket takes (uvloop then never wakes that one).
            upstream.close()
            raise
        if not upstream.idle:
            upstream.close()
            return None, keep
        return upstream, keep

    async def _send(self, sock: socket.socket, conn: Connection, data: bytes | bytearray) -> None:
        """To the client. One that takes no byte for the keep-alive limit would hold its
        connection and an upstream for ever (as a relayed tunnel that moves no byte would): it
        is closed and the closing recorded."""
        if not await send_to_client(
            self.checkpoint, conn, sock, data, stall=self.keepalive_idle, what=" of its response"
        ):
            raise _Closed()

    async def _exchange(
        self,
        sock: socket.socket,
        conn: Connection,
        head: PlainHead,
        upstream: _Upstream,
        request: Request,
    ) -> bool:
        """Send the request, relay its response; whether the client connection stays open.
        ``upstream.idle`` says afterwards whether its connection may carry the next request."""
        upstream.idle = False
        await sockio.send_all(upstream.sock, _request_bytes(head), stall=UPSTREAM_TIMEOUT)
        pending = b""
        for _ in range(MAX_RESPONSE_HEAD + 1):  # every read adds a byte at least
            more = await upstream.recv()
            if not more:
                raise _Closed()
            pending += more
            end = pending.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._check_response_head(pending, upstream)  # every start of it, as it comes
            if len(pending) > MAX_RESPONSE_HEAD:
                raise _Closed()
        else:
            raise _Closed()
        if end + 4 > MAX_RESPONSE_HEAD:  # the bound holds for a head that came in one read, too
            log.warning("closed: a response head over %d bytes from %s", MAX_RESPONSE_HEAD,
                        upstream.key[0])  # fmt: skip
            raise _Closed()
        # A head the narrow reader takes is one the raw checks pass (its grammar is stricter).
        response = read_response_head(pending, end, head.method)
        if response is None:  # h11's to read; its loop checks the raw head first
            import h11  # here, not at start-up: only the rarer response shapes need it

            try:
                return await self._exchange_h11(sock, conn, head, upstream, pending, request)
            except h11.ProtocolError:
                raise _Closed() from None
        conn.bytes_in += response.announced
        # The body is counted through: ``length`` bytes, and not one more.
        received = len(pending) - response.size
        extra = received > response.length
        left = max(response.length - received, 0)
        out = response.head + pending[response.size : response.size + response.length]
        while left > 0:
            await self._send(sock, conn, out)
            out = await upstream.recv()
            if not out:
                raise _Closed()  # cut short
            if len(out) > left:
                extra = True
                out = out[:left]
            left -= len(out)
        await self._send(sock, conn, out)
        if extra:
            log.warning("closed: bytes after the response from %s", upstream.key[0])
            raise _Closed()
        upstream.idle = response.keep_alive and not head.close
        return not (head.close or response.closes)

    def _refuse_switch(
        self, conn: Connection, request: Request, method: str, head: bytes, upstream: _Upstream
    ) -> None:
        """A ``101`` to a request this path serves (never an upgrade: ``Upgrade`` is not taken):
        recorded as a refusal, as the mitmproxy adapter records it, and both connections closed
        before anything of it reaches the client (h11 would only refuse it unrecorded)."""
        upgrade = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"upgrade":
                upgrade = value.strip().decode("latin-1")
        detail = switch_problem(False, method, 101, upgrade)
        log.warning("closed: a switch of protocols from %s:%s", upstream.key[0], upstream.key[1])
        if detail is not None:
            self.checkpoint.refuse_switch(conn, request, detail)
        raise _Closed()

    @staticmethod
    def _check_response_head(head: bytes, upstream: _Upstream) -> None:
        """Close both connections on an ambiguous response head (or start of one)."""
        problem = response_head_problem(head)
        if problem is not None:
            log.warning("closed: %s from %s:%s", problem, upstream.key[0], upstream.key[1])
            raise _Closed()

    async def _exchange_h11(
        self,
        sock: socket.socket,
        conn: Connection,
        head: PlainHead,
        upstream: _Upstream,
        pending: bytes,
        request: Request,
    ) -> bool:
        """:meth:`_exchange` for a response :func:`read_response_head` leaves to h11 (an
        informational response, a chunked body or one delimited by the close, an unusual
        spelling); ``pending``: what was received, a whole response head first. Raises
        h11.ProtocolError where h11 refuses what the upstream sent."""
        import h11

        parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        parser.send(h11.Request(method=head.method, target=head.target, headers=list(head.fields)))
        parser.send(h11.EndOfMessage())
        out = bytearray()  # for the client: sent in one write per read from the upstream
        chunked = False
        closes = head.close
        events = informational = 0
        while True:
            # An event costs far more than its bytes (a one-byte chunk is one): an upstream that
            # sends them faster than they are parsed never lets a read wait, nor a client that
            # takes them a send, and one response would hold every other connection for as
            # long as both go on.
            await sockio.take_turns(events, EVENTS_PER_TURN)
            events += 1
            if parser.their_state is h11.SEND_RESPONSE:
                # A response head (final or 1xx): checked whole before h11 reads it.
                end = pending.find(b"\r\n\r\n")
                self._check_response_head(pending[: end + 2] if end >= 0 else pending, upstream)
                if end + 4 > MAX_RESPONSE_HEAD:  # whole or not, over the bound (a 1xx's too)
                    raise _Closed()
                if end < 0:
                    if len(pending) > MAX_RESPONSE_HEAD:
                        raise _Closed()
                    if out:
                        await self._send(sock, conn, out)
                        out.clear()
                    more = await upstream.recv()
                    if not more:
                        raise _Closed()
                    pending += more
                    continue
                if _SWITCH.match(pending):
                    self._refuse_switch(conn, request, head.method, pending[: end + 2], upstream)
                parser.receive_data(pending[: end + 4])
                pending = pending[end + 4 :]
            elif pending:
                parser.receive_data(pending)
                pending = b""
            event = parser.next_event()
            if event is h11.NEED_DATA:
                if out:
                    await self._send(sock, conn, out)
                    out.clear()
                more = await upstream.recv()
                parser.receive_data(more)  # b"" is the upstream's EOF
                continue
            if isinstance(event, h11.InformationalResponse):
                informational += 1
                if informational > MAX_INFORMATIONAL:
                    log.warning("closed: over %d informational responses from %s",
                                MAX_INFORMATIONAL, upstream.key[0])  # fmt: skip
                    raise _Closed()
            if isinstance(event, (h11.InformationalResponse, h11.Response)):
                names = {name.lower() for name, _ in event.headers.raw_items()}
                if isinstance(event, h11.Response):
                    # A response to HEAD, a 204 and a 304 have no body whatever their head
                    # announces (h11 frames them so): nothing of a body is added for them either.
                    bodied = head.method != "HEAD" and event.status_code not in (204, 304)
                    chunked = bodied and b"transfer-encoding" in names
                    until_eof = bodied and b"content-length" not in names and not chunked
                    closes = closes or until_eof or _closes(event)
                    length = _content_length(event)
                    conn.bytes_in += length
                out += _response_head(event)
            elif isinstance(event, h11.Data):
                data = bytes(event.data)
                if chunked and data:
                    data = b"%x\r\n%s\r\n" % (len(data), data)
                out += data
            elif isinstance(event, h11.EndOfMessage):
                if chunked:
                    trailers = b"".join(
                        n + b": " + v + b"\r\n" for n, v in event.headers.raw_items()
                    )
                    out += b"0\r\n" + trailers + b"\r\n"
                await self._send(sock, conn, out)
                if pending or parser.trailing_data[0]:
                    log.warning("closed: bytes after the response from %s", upstream.key[0])
                    raise _Closed()
                try:
                    parser.start_next_cycle()  # raises unless both sides may go on
                except h11.LocalProtocolError:
                    return not closes
                upstream.idle = True
                return not closes
            else:  # ConnectionClosed, PAUSED: a response cut short or out of turn
                raise _Closed()


def _request_bytes(head: PlainHead) -> bytes:
    """The request in origin form, with the client's fields in their order and spelling (a head
    :func:`read_head` took is valid HTTP/1.1 as it is: no validation left to do)."""
    lines = [f"{head.method} {head.target} HTTP/1.1".encode()]
    lines += [name + b": " + value for name, value in head.fields]
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _closes(response: h11.Response) -> bool:
    """As mitmproxy decides: the response's Connection header, else its HTTP version."""
    tokens: set[str] = set()
    for name, value in response.headers.raw_items():
        if name.lower() == b"connection":
            tokens |= {t.strip().lower() for t in value.decode("latin-1").split(",")}
    if "close" in tokens:
        return True
    if "keep-alive" in tokens:
        return False
    return response.http_version != b"1.1"


def _content_length(response: h11.Response) -> int:
    for name, value in response.headers.raw_items():
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _response_head(event: h11.Response | h11.InformationalResponse) -> bytes:
    """The head as the upstream sent it (its spelling and order), with CRLF line ends."""
    lines = [b"HTTP/%s %d %s" % (event.http_version, event.status_code, event.reason)]
    lines += [name + b": " + value for name, value in event.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _consume(sock: socket.socket, size: int, watch: sockio.Watch) -> None:
    """Take the ``size`` bytes of a head that was peeked (already in the socket's buffer)."""
    left = size
    with contextlib.suppress(BlockingIOError, InterruptedError):
        got = sock.recv(left)  # without a wait: a peeked head is all there
        if not got:
            raise _Closed()
        left -= len(got)
    for _ in range(size + 1):
        if not left:
            return
        got = await sockio.recv(sock, left, watch=watch)
        if not got:
            raise _Closed()
        left -= len(got)
    raise _Closed()


async def _dial(
    client: socket.socket, target: str, port: int, key: tuple[str, int, str], stall: float
) -> _Upstream:
    up = socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET)
    try:
        up.setblocking(False)
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await sockio.connect(up, (target, port))
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, TimeoutError):
        up.close()
        with contextlib.suppress(OSError):
            await sockio.send_all(client, BAD_GATEWAY, stall=stall)
        raise _Closed() from None
    return _Upstream(up, key)


__all__ = ["Outcome", "PlainHead", "PlainHttp", "read_head", "response_head_problem"]
