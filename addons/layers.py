"""Chooses the protocol layer for every connection, so nothing the gate did not look at is ever relayed.

This replaces mitmproxy's NextLayer addon (it subclasses it for the one case it handles well: the explicit
proxy's first layer). Inside an allowed CONNECT tunnel the first bytes decide:

- port 80: plain HTTP, parsed so each request's Host is checked against the CONNECT host;
- port 22: must start with an SSH identification string (git over ssh), then relayed untouched;
- anything else must be a TLS ClientHello whose SNI names the CONNECT host and which carries no
  Encrypted Client Hello; it is then relayed untouched (passthrough, no interception, no CA needed).

Everything else, including any stack shape we did not plan for, gets a layer that closes the client
connection: an unknown case fails closed instead of falling through to mitmproxy's defaults.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.http._http1 import Http1Server, make_error_response
from mitmproxy.proxy.layers.modes import HttpProxy
from mitmproxy.proxy.layers.tls import parse_client_hello

from addons.gate import ClientState, GateAddon
from proxy.core.decision import Decision, Reason

ECH_EXTENSION = 0xFE0D  # encrypted_client_hello (RFC 9849); hides the real SNI from the gate
MAX_CLIENT_HELLO = (
    64 * 1024
)  # a ClientHello larger than this is not a real client; refuse, don't buffer
SSH_PORT = 22
PLAIN_HTTP_PORT = 80
MAX_REQUEST_HEAD = 64 * 1024  # request line + headers; mitmproxy itself has no bound (threat 13)


class CloseLayer(layer.Layer):
    """Closes the client connection as soon as it starts; nothing is ever sent upstream."""

    def _handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)


class BoundedHttp1Server(Http1Server):
    """mitmproxy's HTTP/1 server side, refusing request heads larger than MAX_REQUEST_HEAD.

    Upstream buffers an unterminated head forever ("FIXME: protect against header size DoS"), so one
    client could grow the gate's memory without limit."""

    def read_headers(self, event: events.ConnectionEvent) -> Generator[commands.Command, Any, None]:
        yield from super().read_headers(event)
        if self.state == self.read_headers and len(self.buf) > MAX_REQUEST_HEAD:
            yield commands.SendData(self.conn, make_error_response(431, "request head too large"))
            yield commands.CloseConnection(self.conn)
            self.state = self.done


def bounded_http(layer_: layers.HttpLayer) -> layers.HttpLayer:
    """Preset the client-side HTTP/1 connection of an HttpLayer to the bounded one (HttpLayer keeps a
    preset connection instead of creating its own)."""
    if layer_.context.client.alpn in (None, b"", b"http/1.1"):
        layer_.connections[layer_.context.client] = BoundedHttp1Server(layer_.context.fork())
    return layer_


class CountingTCPLayer(layers.TCPLayer):
    """Passthrough relay (no interception, no per-message hooks) that counts bytes each way for the
    connection-closed evidence: one length addition per chunk on the hot path."""

    def __init__(self, context: Context, state: ClientState) -> None:
        super().__init__(context, ignore=True)
        self.state = state

    def handle_event(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self.state.bytes_out += len(event.data)
            else:
                self.state.bytes_in += len(event.data)
        yield from super().handle_event(event)


class GateLayers(NextLayer):
    def __init__(self, gate: GateAddon) -> None:
        super().__init__()
        self.gate = gate

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer:
            return
        context = nextlayer.context
        data = nextlayer.data_client()
        if len(context.layers) == 1 and isinstance(context.layers[0], HttpProxy):
            if starts_like_tls_record(data):
                # TLS to the proxy itself (a "secure web proxy") is not offered: no certificates to
                # present, and a client speaking it would otherwise reach mitmproxy's TLS layers.
                nextlayer.layer = CloseLayer(context)
                return
            super().next_layer(nextlayer)
            if isinstance(nextlayer.layer, layers.HttpLayer):
                bounded_http(nextlayer.layer)
            return
        tunnel = self.gate.tunnel_of(context.client)
        if tunnel is None or context.server.address is None:
            nextlayer.layer = CloseLayer(context)  # a stack we did not plan for: fail closed
            return
        nextlayer.layer = self._tunnel_layer(context, tunnel, data)
        if nextlayer.layer is not None:
            self.gate.request_started(context.client)

    def _tunnel_layer(self, context: Context, tunnel: Decision, data: bytes) -> layer.Layer | None:
        """The layer for a tunnel's first bytes, or None to wait for more of them."""
        if not data:
            return None
        port = tunnel.port
        if port == PLAIN_HTTP_PORT:
            return bounded_http(layers.HttpLayer(context, HTTPMode.transparent))
        if port == SSH_PORT:
            if len(data) < 4 and b"SSH-".startswith(data):
                return None
            if data.startswith(b"SSH-"):
                return CountingTCPLayer(context, self.gate.state_of(context.client))
            return self._refuse(context, tunnel, Reason.NOT_TLS, "port 22 tunnels must carry SSH")
        if len(data) < 3 and data[:1] == b"\x16":
            return None
        if not starts_like_tls_record(data):
            return self._refuse(
                context, tunnel, Reason.NOT_TLS, f"the tunnel to port {port} must start with TLS"
            )
        try:
            hello = parse_client_hello(data)
        except ValueError:
            return self._refuse(context, tunnel, Reason.NOT_TLS, "malformed TLS ClientHello")
        if hello is None:
            if len(data) > MAX_CLIENT_HELLO:
                return self._refuse(context, tunnel, Reason.NOT_TLS, "oversized TLS ClientHello")
            return None
        if any(ext_type == ECH_EXTENSION for ext_type, _ in hello.extensions):
            return self._refuse(
                context,
                tunnel,
                Reason.ECH_REFUSED,
                "Encrypted Client Hello hides the destination; disable ECH for this client",
            )
        decision = self.gate.decide_tunnel_contents(context.client, tunnel, sni=hello.sni)
        if not decision.allowed:
            return CloseLayer(context)
        return CountingTCPLayer(context, self.gate.state_of(context.client))

    def _refuse(
        self, context: Context, tunnel: Decision, reason: Reason, detail: str
    ) -> layer.Layer:
        self.gate.decide_tunnel_contents(context.client, tunnel, violation=(reason, detail))
        return CloseLayer(context)
