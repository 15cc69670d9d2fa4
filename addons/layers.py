"""Chooses the protocol layer for every connection, so nothing the gate did not look at is ever relayed.

This replaces mitmproxy's NextLayer addon (it subclasses it for the one case it handles well: the explicit
proxy's first layer). Inside an allowed CONNECT tunnel the core's classifier
(:func:`proxy.core.firstbytes.classify`) and the checkpoint decide the first bytes; this module only
maps the answer to a layer: HTTP on port 80 (each request is then decided by the gate), a byte-counting
passthrough relay for an admitted ClientHello or SSH banner, a closing layer for a refusal.

Everything else, including any stack shape nobody planned for, gets a layer that closes the client
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

from addons.gate import GateAddon
from addons.tunnels import MAX_REQUEST_HEAD
from proxy.core.connections import Connection
from proxy.core.firstbytes import Protocol, classify


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

    def __init__(self, context: Context, state: Connection) -> None:
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
                nextlayer.layer = self._close(context)
                return
            super().next_layer(nextlayer)
            if isinstance(nextlayer.layer, layers.HttpLayer):
                bounded_http(nextlayer.layer)
            return
        tunnel = self.gate.tunnel_of(context.client)
        if tunnel is None or context.server.address is None:
            nextlayer.layer = self._close(context)  # a stack nobody planned for: fail closed
            return
        nextlayer.layer = self._tunnel_layer(context, tunnel.port, data)

    def _tunnel_layer(self, context: Context, port: int | None, data: bytes) -> layer.Layer | None:
        """The layer for a tunnel's first bytes, or None to wait for more of them."""
        first = classify(port, data)
        if first.protocol is Protocol.WAIT:
            return None
        decision = self.gate.admit_tunnel(context.client, first)
        if first.protocol is Protocol.HTTP:
            return bounded_http(layers.HttpLayer(context, HTTPMode.transparent))
        if decision is not None and not decision.allowed:
            return self._close(context)
        return CountingTCPLayer(context, self.gate.connection_of(context.client))

    def _close(self, context: Context) -> layer.Layer:
        """Close the client at once. The layer's CloseConnection alone cancels mitmproxy's reader
        task, which can be swallowed while the client keeps sending (the socket then stays open);
        closing the transport as well cannot be."""
        self.gate.close_client(context.client)
        return CloseLayer(context)
