"""The gate addon: translates mitmproxy hook events into checkpoint calls and enforces the answers.

The admission order lives in :mod:`proxy.core.checkpoint`; nothing here decides anything. Where each
kind of traffic reaches the checkpoint:

- a new client connection in ``client_connected`` (the per-client cap);
- CONNECT tunnels in ``http_connect``, before any upstream connection exists (connection_strategy=lazy);
- the first bytes inside an allowed tunnel in ``next_layer`` (see :mod:`addons.layers`);
- plain-HTTP requests in ``requestheaders``, before the body is read;
- ``server_connect`` is the last line: it lets mitmproxy dial only an address the checkpoint pinned for
  that client connection. Anything else is vetoed, so a path nobody foresaw fails closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from addons.refusal import refusal_response, strip_egress_headers
from addons.tunnels import DEFAULT_REQUEST_DEADLINE, accepted_at, current_sandbox
from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Decision, Kind, Reason, Request
from proxy.core.firstbytes import FirstBytes
from proxy.core.framing import framing_problem
from proxy.core.hosts import InvalidHost, canonical_host

log = logging.getLogger(__name__)


class GateAddon:
    """mitmproxy addon enforcing the checkpoint's decisions on CONNECT, tunnels and plain HTTP."""

    def __init__(
        self, checkpoint: Checkpoint, *, request_deadline: float = DEFAULT_REQUEST_DEADLINE
    ) -> None:
        self.checkpoint = checkpoint
        self.request_deadline = request_deadline
        # Set by the master: mitmproxy's handler per client id, used to close silent connections.
        self.connection_handlers: dict[Any, Any] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}

    # -- connection lifecycle ------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        _, refusal = self.checkpoint.connected(client.id, _peer(client), current_sandbox.get())
        if refusal is not None:
            client.error = "egress: too many connections from this client"
            return
        self._arm_deadline(client, since=accepted_at.get())

    def client_disconnected(self, client: connection.Client) -> None:
        self._cancel_deadline(client)
        self.checkpoint.disconnected(client.id)

    def _arm_deadline(self, client: connection.Client, since: float | None = None) -> None:
        """A connection must deliver a complete request head (and a tunnel its first bytes) within
        ``request_deadline`` seconds (of ``since``, if given); a silent or dribbling one is closed
        (slowloris, threat 13)."""
        self._cancel_deadline(client)
        if self.request_deadline > 0:
            delay = self.request_deadline
            if since is not None:
                delay = max(0.0, delay - (time.monotonic() - since))
            self._deadlines[client.id] = asyncio.get_running_loop().call_later(
                delay, self._deadline_passed, client
            )

    def _cancel_deadline(self, client: connection.Client) -> None:
        handle = self._deadlines.pop(client.id, None)
        if handle is not None:
            handle.cancel()

    def request_started(self, client: connection.Client) -> None:
        self._cancel_deadline(client)

    def _deadline_passed(self, client: connection.Client) -> None:
        self._deadlines.pop(client.id, None)
        conn = self.checkpoint.connections.get(client.id)
        if conn is None or client.id not in self.connection_handlers:
            return
        self.checkpoint.refuse_connection(
            conn,
            Reason.REQUEST_TIMEOUT,
            f"no complete request within {self.request_deadline:g} s; the connection was closed",
        )
        self.close_client(client)

    def close_client(self, client: connection.Client) -> None:
        """Close the client's socket itself. Cancelling mitmproxy's reader task instead races with
        the event it is processing (the cancellation can be swallowed and the socket stays open)."""
        handler = self.connection_handlers.get(client.id)
        io = handler.transports.get(handler.client) if handler is not None else None
        writer = getattr(io, "writer", None)
        if writer is not None and not writer.is_closing():
            writer.close()

    def _conn(self, client: connection.Client) -> Connection:
        return self.checkpoint.connections.state_of(client.id, _peer(client))

    # -- CONNECT -------------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        self.request_started(flow.client_conn)
        conn = self._conn(flow.client_conn)
        credential = flow.request.headers.pop("proxy-authorization", None)
        request = Request(Kind.CONNECT, flow.request.host, flow.request.port, "CONNECT")
        decision = await self.checkpoint.admit(conn, request, credential=credential)
        if not decision.allowed:
            flow.response = refusal_response(decision)
            return
        self.checkpoint.opened(conn, decision)
        self._arm_deadline(flow.client_conn)  # now for the tunnel's first bytes

    # -- plain HTTP ----------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.request_started(flow.client_conn)
        req = flow.request
        strip_egress_headers(req.headers)
        conn = self._conn(flow.client_conn)
        credential = req.headers.pop("proxy-authorization", None)
        request = Request(Kind.HTTP, req.host, req.port, req.method, req.path.split("?", 1)[0])
        problem = framing_problem(
            req.scheme,
            req.host,
            req.port,
            req.headers.get_all("host"),
            req.authority or None,  # only left set for absolute-form targets inside a tunnel
        )
        decision = await self.checkpoint.admit(
            conn, request, credential=credential, problem=problem
        )
        if not decision.allowed:
            if req.stream:
                # mitmproxy already chose to stream this large body and cannot answer before reading
                # it; close the connection instead of letting the client hang (the decision stands).
                flow.kill()
                self.close_client(flow.client_conn)
                return
            flow.response = refusal_response(decision)
            return
        self.checkpoint.opened(conn, decision)
        if content_length := req.headers.get("content-length", ""):
            conn.bytes_out += int(content_length) if content_length.isdigit() else 0
        if decision.address is not None:
            # Pin by rewriting only the dial target; the Host header the client sent stays intact.
            # mitmproxy reuses upstream connections keyed by (host, port), so keep-alive keeps working.
            req.data.host = decision.address

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        conn = self.checkpoint.connections.get(flow.client_conn.id)
        if conn is not None and flow.response is not None:
            length = flow.response.headers.get("content-length", "")
            conn.bytes_in += int(length) if length.isdigit() else 0

    # -- the choke point -----------------------------------------------------------------------

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Only dial addresses the checkpoint pinned for this client; names become their pin."""
        address = data.server.address
        conn = self.checkpoint.connections.get(data.client.id)
        if address is None or conn is None:
            data.server.error = "egress: destination was not checked by the gate"
            return
        host, port = str(address[0]), int(address[1])
        target = self.checkpoint.dial_target(conn, host, port)
        if target is None:
            data.server.error = (
                f"egress: refusing to dial {host}:{port}, it was not checked by the gate"
            )
            log.error("vetoed an unchecked upstream connection to %s:%s", host, port)
            return
        data.server.address = (target, port)
        if data.server.sni is None and not _is_ip(host):
            data.server.sni = host

    # -- used by the tunnel layer decider --------------------------------------------------------

    def tunnel_of(self, client: connection.Client) -> Decision | None:
        conn = self.checkpoint.connections.get(client.id)
        return conn.tunnel if conn else None

    def admit_tunnel(self, client: connection.Client, first: FirstBytes) -> Decision | None:
        self.request_started(client)
        return self.checkpoint.admit_tunnel(self._conn(client), first)

    def connection_of(self, client: connection.Client) -> Connection:
        return self._conn(client)


def _peer(client: connection.Client) -> str | None:
    peer = client.peername
    return f"{peer[0]}:{peer[1]}" if peer else None


def _is_ip(host: str) -> bool:
    try:
        return not isinstance(canonical_host(host), str)
    except InvalidHost:
        return False
