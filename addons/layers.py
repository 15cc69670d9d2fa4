"""Chooses the protocol layer for every connection, so nothing the gate did not look at is ever relayed.

This replaces mitmproxy's NextLayer addon (it subclasses it for the one case it handles well: the explicit
proxy's first layer). Inside an allowed CONNECT tunnel the core's classifier
(:func:`proxy.core.firstbytes.classify`) and the checkpoint decide the first bytes; this module only
maps the answer to a layer: HTTP on port 80 (each request is then decided by the gate), a byte-counting
passthrough relay for an admitted ClientHello or SSH banner, a closing layer for a refusal, and for a
tunnel the checkpoint marked *inspected*: mitmproxy's TLS layers (terminating the client's TLS, opening
verified TLS upstream) with an HTTP layer inside, so each request comes back to the gate.

Everything else, including any stack shape nobody planned for, gets a layer that closes the client
connection: an unknown case fails closed instead of falling through to mitmproxy's defaults.

The HTTP layers use :class:`GateStream`: a request body the gate holds to decide (or refused) is
bounded and never switched to streaming, so nothing of it can reach an upstream before the decision.
"""

from __future__ import annotations

import html
import re
import weakref
from collections.abc import Generator
from typing import Any

import addons.mitmaddons  # noqa: F401  (first: mitmproxy's addon modules without its default set)

# isort: split
import h2.errors
from mitmproxy import connection, flow, tls
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HTTPMode, HttpStream, SendHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    HttpEvent,
    RequestData,
    RequestEndOfMessage,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseData,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpRequestHeadersHook
from mitmproxy.proxy.layers.http._http1 import Http1Server, make_error_response
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.proxy.layers.modes import HttpProxy
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer

from addons.gate import ENDED, HELD, OVERFLOW, GateAddon
from proxy.core.connections import Connection
from proxy.core.decision import Decision, Reason
from proxy.core.firstbytes import MAX_CLIENT_HELLO, Protocol, classify
from proxy.core.framing import MAX_REQUEST_HEAD
from proxy.core.helloretry import asks_again, second_hello
from proxy.core.text import escape

INSPECTED_ALPNS = (None, b"", b"http/1.1", b"h2")  # what a client may negotiate with the gate
UPSTREAM_ALPNS = (b"h2", b"http/1.1")  # what the gate may offer an inspected tunnel's upstream


class CloseLayer(layer.Layer):
    """Closes the client connection as soon as it starts; nothing is ever sent upstream."""

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class BoundedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server side with the gate's view of request heads: each head is timed from
    its first byte, a head over MAX_REQUEST_HEAD is refused (upstream buffers an unterminated head
    forever: "FIXME: protect against header size DoS"), and every head the parser refuses is a
    recorded decision, not only a 400 on the wire."""

    def __init__(self, context: Context, gate: GateAddon) -> None:
        super().__init__(context)
        self.gate = gate

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        starts_a_head = isinstance(event, events.DataReceived) and self.state == self.read_headers
        if starts_a_head and not self.buf:
            self.gate.head_started(self.context.client)
        try:
            yield from super()._handle_event(event)
        except NotImplementedError:
            # mitmproxy's HTTP/1 reader raises this for a chunked request body that ends in
            # trailer fields, and the connection then hangs with nobody reading it: refused and
            # closed instead (nothing after the trailers is read or sent).
            self.gate.refuse_head(
                self.context.client,
                Reason.BAD_REQUEST,
                "trailer fields after a chunked request body are not supported",
            )
            yield commands.SendData(self.conn, make_error_response(400, "request trailers"))
            yield commands.CloseConnection(self.conn)
            self.state = self.done

    def send(self, event: HttpEvent) -> Generator[commands.Command, Any, None]:
        """mitmproxy answers a request that names no destination (no Host, an empty one,
        ``PRI * HTTP/2.0`` sent to the proxy) with a 400 before any hook sees it: recorded as the
        refusal it is (nothing is sent upstream either way)."""
        if (
            isinstance(event, ResponseProtocolError)
            and event.code is ErrorCode.DESTINATION_UNKNOWN
            and self.response is None
        ):
            detail = f"the request names no destination: {escape(event.message, 200)}"
            self.gate.refuse_head(self.context.client, Reason.BAD_REQUEST, detail)
        yield from super().send(event)

    def read_headers(self, event: events.ConnectionEvent) -> Generator[commands.Command, Any, None]:
        for command in super().read_headers(event):
            if isinstance(command, commands.SendData) and command.data.startswith(b"HTTP/1.1 400"):
                detail = parser_refusal(command.data)
                self.gate.refuse_head(self.context.client, Reason.BAD_REQUEST, detail)
            yield command
        if self.state == self.read_headers and len(self.buf) > MAX_REQUEST_HEAD:
            self.gate.refuse_head(
                self.context.client,
                Reason.HEAD_TOO_LARGE,
                f"the request head is larger than {MAX_REQUEST_HEAD} bytes",
            )
            yield commands.SendData(self.conn, make_error_response(431, "request head too large"))
            yield commands.CloseConnection(self.conn)
            self.state = self.done


_PARSER_MESSAGE = re.compile(rb"<p>(.*?)</p>", re.DOTALL)


def parser_refusal(response: bytes) -> str:
    """The detail recorded for a 400 mitmproxy's parser answered: the message of its HTML error
    page, unescaped, on one line and escaped (it quotes what the client sent)."""
    found = _PARSER_MESSAGE.search(response.partition(b"\r\n\r\n")[2])
    said = html.unescape(found.group(1).decode("utf-8", "replace")) if found else "unreadable"
    return f"the request head was refused as malformed: {escape(' '.join(said.split()), 200)}"


class RecordedHttp2Server(Http2Server):
    """mitmproxy's HTTP/2 server side, except that a protocol error it ends the client's connection
    for (a malformed frame, invalid request headers, a flow-control violation) is a recorded
    refusal, not only a GOAWAY on the wire: nothing of it was sent upstream, and the record says
    why the connection ended."""

    def __init__(self, context: Context, gate: GateAddon) -> None:
        super().__init__(context)
        self.gate = gate

    def protocol_error(
        self, message: str, error_code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR
    ) -> layer.CommandGenerator[None]:
        detail = f"the HTTP/2 connection was ended: {escape(message, 200)}"
        self.gate.refuse_head(self.context.client, Reason.BAD_REQUEST, detail)
        yield from super().protocol_error(message, error_code)


def bounded_http(layer_: layers.HttpLayer, gate: GateAddon) -> layers.HttpLayer:
    """Preset the client-side connection of an HttpLayer to the gate's (HttpLayer keeps a preset
    connection instead of creating its own): the bounded HTTP/1 one, or the HTTP/2 one whose
    protocol errors are recorded."""
    alpn = layer_.context.client.alpn
    if alpn in (None, b"", b"http/1.1"):
        layer_.connections[layer_.context.client] = BoundedHttp1Server(layer_.context.fork(), gate)
    elif alpn == b"h2":
        layer_.connections[layer_.context.client] = RecordedHttp2Server(layer_.context.fork(), gate)
    return layer_


class GateStream(HttpStream):
    """mitmproxy's per-request stream, except for request bodies the gate holds or refused, request
    trailers, and HTTP/2 bodies sent on over HTTP/1.

    Upstream switches any body past ``stream_large_bodies`` to streaming, which opens the upstream
    connection and sends the head. A held body (``flow.metadata[HELD]`` = the byte limit) is buffered
    up to its limit and then only counted (``OVERFLOW``); a refused request's body is read and dropped.
    Either way nothing is streamed before the gate has decided, and memory stays bounded.

    Trailer fields after a request body arrive once the request has been decided; they would carry
    what its head may not (``X-Egress-*``, ``Proxy-Authorization``, a method override, a
    placeholder): the request is refused as ``bad-request``, as HTTP/1 trailers are, and an upstream
    that already has its head never sees it end. An HTTP/2 request need not state its body's length;
    sent on over HTTP/1 without one, its body would be read by the upstream as further requests the
    gate never judged: it gets its length (buffered) or the chunked coding (streamed)."""

    def __init__(self, context: Context, stream_id: int, gate: GateAddon) -> None:
        super().__init__(context, stream_id)
        self.gate = gate

    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        """mitmproxy's, telling the gate's hook whether the head ended its stream (``ENDED``): an
        HTTP/2 or HTTP/3 request without a length then has no body, where one whose stream goes on
        may send any (the hook is given the flow only)."""
        commands = super().state_wait_for_request_headers(event)
        reply: Any = None
        while True:
            try:
                command = commands.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(command, HttpRequestHeadersHook):
                command.flow.metadata[ENDED] = bool(event.end_stream)
            reply = yield command

    def check_body_size(self, request: bool) -> layer.CommandGenerator[bool]:
        flow = getattr(self, "flow", None)
        if request and flow is not None:
            limit = flow.metadata.get(HELD)
            if flow.response is not None or limit is not None:
                if limit is None:
                    self.request_body_buf.clear()
                elif len(self.request_body_buf) > limit:
                    flow.metadata[OVERFLOW] = True
                    self.request_body_buf.clear()
                return False
        return (yield from super().check_body_size(request))

    def state_consume_request_body(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestTrailers) and self.flow.response is None:
            # (a request already refused sends nothing upstream: its refusal stands alone)
            yield from self._refuse_trailers(streamed=False)
            return
        yield from super().state_consume_request_body(event)

    def state_stream_request_body(
        self, event: RequestData | RequestEndOfMessage
    ) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestTrailers):
            yield from self._refuse_trailers(streamed=True)
            return
        yield from super().state_stream_request_body(event)

    def _refuse_trailers(self, *, streamed: bool) -> layer.CommandGenerator[None]:
        detail = "trailer fields after a request body are not supported"
        self.gate.refuse_head(self.context.client, Reason.BAD_REQUEST, detail)
        self.flow.error = flow.Error(detail)
        yield SendHttp(
            ResponseProtocolError(self.stream_id, detail, ErrorCode.GENERIC_CLIENT_ERROR),
            self.context.client,
        )
        self.client_state = self.state_errored
        if streamed:  # the upstream has the head (and some body): it must not see the request end
            yield SendHttp(
                RequestProtocolError(self.stream_id, detail, ErrorCode.GENERIC_CLIENT_ERROR),
                self.context.server,
            )
            self.server_state = self.state_errored
        self.flow.live = False

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        ok = yield from super().make_server_connection()
        request = self.flow.request
        if ok and (request.is_http2 or request.is_http3) and self.context.server.alpn != b"h2":
            framed = "content-length" in request.headers or "transfer-encoding" in request.headers
            if not framed and self.client_state == self.state_done:  # the whole body is here
                if request.raw_content:
                    request.headers["content-length"] = str(len(request.raw_content))
            elif not framed:  # streamed from here on
                request.headers["transfer-encoding"] = "chunked"
        return ok


class GateHttpLayer(layers.HttpLayer):
    """mitmproxy's HTTP layer with :class:`GateStream` streams, counting the body bytes that go to
    upstreams and come back from them for the connection-closed evidence: every body chunk, held
    or streamed, of a declared length or not (HTTP/2, chunked), in an inspected tunnel as in plain
    HTTP. Refused requests' bodies (never sent) and the gate's own refusals are not counted."""

    def __init__(self, context: Context, mode: HTTPMode, gate: GateAddon) -> None:
        super().__init__(context, mode)
        self.gate = gate

    def event_to_child(
        self, child: layer.Layer | HttpStream, event: events.Event
    ) -> layer.CommandGenerator[None]:
        # A RequestData handed to a connection (not a stream) is on its way to an upstream; a
        # ResponseData handed to a stream came from one (the stream's own go to the client's).
        if isinstance(event, RequestData | ResponseData):
            to_upstream = isinstance(event, RequestData)
            state = self.gate.state_of(self.context.client)
            if state is not None and to_upstream != isinstance(child, HttpStream):
                if to_upstream:
                    state.bytes_out += len(event.data)
                else:
                    state.bytes_in += len(event.data)
        yield from super().event_to_child(child, event)

    def make_stream(self, stream_id: int) -> layer.CommandGenerator[None]:
        self.streams[stream_id] = GateStream(self.context.fork(), stream_id, self.gate)
        yield from self.event_to_child(self.streams[stream_id], events.Start())


def gate_http(context: Context, mode: HTTPMode, gate: GateAddon) -> layers.HttpLayer:
    return bounded_http(GateHttpLayer(context, mode, gate), gate)


class InspectedClientTLS(ClientTLSLayer):
    """The client side of an inspected tunnel; the HTTP layer inside it is chosen only under this."""


class CountingTCPLayer(layers.TCPLayer):
    """Passthrough relay (no interception, no per-message hooks) that counts bytes each way for the
    connection-closed evidence: one length addition per chunk on the hot path.

    A TLS tunnel's client bytes after its ClientHello (``hello_size`` bytes) are held until the
    server's first handshake message shows whether it asks for a second ClientHello, which is then
    decided as the first was (:mod:`proxy.core.helloretry`)."""

    def __init__(
        self,
        context: Context,
        state: Connection,
        *,
        gate: GateAddon | None = None,
        port: int | None = None,
        hello_size: int = 0,
    ) -> None:
        super().__init__(context, ignore=True)
        self.state = state
        self.gate = gate
        self.port = port
        self.hello_left = hello_size  # client bytes of the first ClientHello not yet relayed
        self.watching = gate is not None and hello_size > 0
        self.retry = False  # the server asked for a second ClientHello
        self.reply = b""  # the server's first bytes, until they say whether it did
        self.held = bytearray()  # client bytes after the ClientHello, not yet relayed (in place)

    def handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self.state.bytes_out += len(event.data)
            else:
                self.state.bytes_in += len(event.data)
        yield from super().handle_event(event)

    def relay_messages(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        """As mitmproxy's, once the upstream is open (events that came while it was being opened
        are replayed here in order), while watching for a second ClientHello."""
        if not self.watching:
            yield from super().relay_messages(event)
        elif isinstance(event, events.DataReceived):
            yield from self._watched(event, event.connection is self.context.client)
        elif isinstance(event, events.ConnectionClosed) and event.connection is self.context.client:
            yield from self._close()  # ended before its handshake was through: nothing held goes
        else:
            yield from super().relay_messages(event)

    def _watched(
        self, event: events.DataReceived, from_client: bool
    ) -> Generator[commands.Command, Any, None]:
        data = event.data
        if from_client:
            if self.hello_left:
                hello, data = data[: self.hello_left], data[self.hello_left :]
                self.hello_left -= len(hello)
                yield from super().relay_messages(events.DataReceived(self.context.client, hello))
            self.held += data
            if self.retry:
                yield from self._second()
            return
        yield from super().relay_messages(event)  # the server's bytes go on as they come
        if self.retry:
            return
        self.reply += data
        asked = asks_again(self.reply)
        if asked is None:
            return
        self.reply = b""
        if not asked:
            yield from self._release()
            return
        self.retry = True
        if self.gate is not None:
            self.gate.head_started(self.context.client)  # the second hello is timed as a head
        yield from self._second()

    def _second(self) -> Generator[commands.Command, Any, None]:
        second = second_hello(self.port, self.held)
        if second.protocol is Protocol.WAIT:
            if len(self.held) > MAX_CLIENT_HELLO + 64 * 1024:  # classify refuses long before
                yield from self._close()
            return
        assert self.gate is not None
        decision = self.gate.admit_tunnel(self.context.client, second)
        if decision is not None and not decision.allowed:
            yield from self._close()
            return
        yield from self._release()

    def _release(self) -> Generator[commands.Command, Any, None]:
        self.watching = False
        held, self.held = bytes(self.held), bytearray()
        if held:
            yield from super().relay_messages(events.DataReceived(self.context.client, held))

    def _close(self) -> Generator[commands.Command, Any, None]:
        self.watching = False
        self.held = bytearray()
        self._handle_event = self.done
        yield commands.CloseConnection(self.context.server)
        yield commands.CloseConnection(self.context.client)


def upstream_alpns(client: connection.Client) -> tuple[bytes, ...]:
    """The protocols offered to an inspected tunnel's upstream: only HTTP the gate speaks and
    decides request by request, in the client's order. mitmproxy would offer whatever the client
    offered: an upstream that serves another protocol on the same port (``imap``, ``xmpp-client``,
    ...; servers and load balancers route by ALPN) could pick it, and would then read the requests
    the gate judged as HTTP as that protocol's commands. With no HTTP among the client's offers,
    HTTP/1.1 (what the gate then speaks); with no offers at all, none (HTTP/1.1 by default)."""
    if not client.alpn_offers:
        return ()
    offered = tuple(dict.fromkeys(p for p in client.alpn_offers if p in UPSTREAM_ALPNS))
    return offered or (b"http/1.1",)


class GateLayers(NextLayer):
    def __init__(self, gate: GateAddon) -> None:
        super().__init__()
        self.gate = gate
        # A tunnel's client bytes so far, per undecided layer: (events read, bytes). mitmproxy's
        # ``data_client()`` joins every event again on each one, so a hello sent a byte at a time
        # would cost quadratic time; here each event is read once.
        self._gathered: weakref.WeakKeyDictionary[layer.NextLayer, tuple[int, bytearray]] = (
            weakref.WeakKeyDictionary()
        )

    def tls_start_server(self, data: tls.TlsData) -> None:
        """Before mitmproxy's TLS config (which runs after this addon and keeps offers already set):
        the upstream of an inspected tunnel, the only TLS the gate opens, is offered HTTP only."""
        data.conn.alpn_offers = upstream_alpns(data.context.client)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer:
            return
        context = nextlayer.context
        if len(context.layers) == 1 and isinstance(context.layers[0], HttpProxy):
            if starts_like_tls_record(nextlayer.data_client()):
                # TLS to the proxy itself (a "secure web proxy") is not offered: no certificates to
                # present, and a client speaking it would otherwise reach mitmproxy's TLS layers.
                nextlayer.layer = self._close(context)
                return
            nextlayer.layer = gate_http(context, HTTPMode.regular, self.gate)
            return
        tunnel = self.gate.tunnel_of(context.client)
        if tunnel is None or context.server.address is None:
            nextlayer.layer = self._close(context)  # a stack nobody planned for: fail closed
            return
        if isinstance(context.layers[-1], InspectedClientTLS):
            nextlayer.layer = self._inspected_http(context)
            return
        nextlayer.layer = self._tunnel_layer(context, tunnel, self._client_data(nextlayer))
        if nextlayer.layer is not None:
            self._gathered.pop(nextlayer, None)

    def _client_data(self, nextlayer: layer.NextLayer) -> bytearray:
        """The client's bytes on an undecided layer, read from the events not read before."""
        read, data = self._gathered.get(nextlayer, (0, bytearray()))
        pending = nextlayer.events
        if len(pending) < read:  # not expected: start again rather than miss a byte
            read, data = 0, bytearray()
        client = nextlayer.context.client
        for event in pending[read:]:
            if isinstance(event, events.DataReceived) and event.connection == client:
                data += event.data
        self._gathered[nextlayer] = (len(pending), data)
        return data

    def _tunnel_layer(
        self, context: Context, tunnel: Decision, data: bytearray
    ) -> layer.Layer | None:
        """The layer for a tunnel's first bytes, or None to wait for more of them."""
        first = classify(tunnel.port, data)
        if first.protocol is Protocol.WAIT:
            return None
        decision = self.gate.admit_tunnel(context.client, first)
        if first.protocol is Protocol.HTTP:
            return gate_http(context, HTTPMode.transparent, self.gate)
        if decision is not None and not decision.allowed:
            return self._close(context)
        state = self.gate.connection_of(context.client)
        if state.inspected and first.protocol is Protocol.TLS:
            return self._intercept(context, tunnel)
        if first.protocol is Protocol.TLS:
            return CountingTCPLayer(
                context, state, gate=self.gate, port=tunnel.port, hello_size=first.size
            )
        return CountingTCPLayer(context, state)

    @staticmethod
    def _intercept(context: Context, tunnel: Decision) -> layer.Layer:
        """Terminate the client's TLS (a certificate for the tunnel's host from the gate's CA) and
        open verified TLS upstream, to the tunnel's pinned address, naming the tunnel's host."""
        if tunnel.address is not None and tunnel.port is not None:
            context.server.address = (tunnel.address, tunnel.port)
        context.server.sni = tunnel.host
        server_tls = ServerTLSLayer(context)
        server_tls.child_layer = InspectedClientTLS(context)
        return server_tls

    def _inspected_http(self, context: Context) -> layer.Layer:
        """Inside an inspected tunnel only HTTP/1.1 or HTTP/2 is spoken; its requests are decided
        one by one by the gate."""
        if not context.client.tls_established or context.client.alpn not in INSPECTED_ALPNS:
            return self._close(context)
        return gate_http(context, HTTPMode.transparent, self.gate)

    def _close(self, context: Context) -> layer.Layer:
        """Close the client at once. The layer's CloseConnection alone cancels mitmproxy's reader
        task, which can be swallowed while the client keeps sending (the socket then stays open);
        closing the transport as well cannot be."""
        self.gate.close_client(context.client)
        return CloseLayer(context)
