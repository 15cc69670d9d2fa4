"""The gate addon: translates mitmproxy hook events into checkpoint calls and enforces the answers.

The admission order lives in :mod:`proxy.core.checkpoint`; nothing here decides anything. Where each
kind of traffic reaches the checkpoint:

- a new client connection in ``client_connected`` (the per-client cap);
- CONNECT tunnels in ``http_connect``, before any upstream connection exists (connection_strategy=lazy);
- the first bytes inside an allowed tunnel in ``next_layer`` (see :mod:`addons.layers`);
- HTTP requests - plain, or inside an inspected tunnel - in ``requestheaders``, before the body is
  read; a request whose rules must read its body is held (:class:`addons.layers.GateStream` keeps it
  bounded and unsent) and decided in ``request``, before any upstream connection exists for it;
- an inspected tunnel's upstream that fails certificate verification in ``tls_failed_server``;
- an upstream's protocol switch (a ``101``) in ``responseheaders``, before mitmproxy switches layers
  (it does so after the ``response`` hook): passed on only for a request allowed as a WebSocket
  upgrade (:mod:`proxy.core.switching`), else refused and the flow killed;
- ``server_connect`` is the last line: it lets mitmproxy dial only an address the checkpoint pinned for
  that client connection. Anything else is vetoed, so a path nobody foresaw fails closed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

from mitmproxy import connection, http, tls
from mitmproxy.proxy import server_hooks

from addons import credentials as creds
from addons.refusal import refusal_response, strip_egress_headers
from addons.tunnels import accepted_at, current_sandbox, handed_over
from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.credentials import Carried, Vault
from proxy.core.decision import Decision, Kind, Reason, Request
from proxy.core.engine import BodyNeeded
from proxy.core.firstbytes import FirstBytes
from proxy.core.framing import Problem, authority_problem, head_problem
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.core.httpheads import http_request, plain_problem
from proxy.core.httpheads import shown_query as _shown_query  # noqa: F401 (kept importable here)
from proxy.core.limits import Limits
from proxy.core.requests import HOLD_LIMIT
from proxy.core.switching import switch_problem
from proxy.core.text import escape

log = logging.getLogger(__name__)


# flow.metadata keys shared with addons.layers.GateStream
HELD = "egress.held"  # the byte limit of a request body held back until the gate decides
OVERFLOW = "egress.overflow"  # the held body went past that limit (and was dropped)
_PENDING = "egress.pending"  # the Request waiting for its body
# An HTTP/2 or HTTP/3 request whose head ended its stream (no body follows; set by GateStream):
# without a length, such a request is told apart from one whose body is still to come.
ENDED = "egress.ended"
_ADMITTED = "egress.admitted"  # the allow a request's head got (its buffered body is checked too)
_ALLOWED = "egress.allowed"  # the Request the gate let through (what a protocol switch is held to)


# What stopping a flow at each stage keeps back (see GateAddon._stop_flow).
_STOPPED = {
    "CONNECT": "it was stopped before anything was dialled",
    "request": "it was stopped before anything of it went upstream",
    "request body": "it was stopped (a held body was not sent; a streamed one had gone)",
    "response": "its response was stopped",
    "response trailers": "its response was stopped",
}


class GateAddon:
    """mitmproxy addon enforcing the checkpoint's decisions on CONNECT, tunnels and plain HTTP."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        request_deadline: float = Limits().request_timeout,
        query_values: bool = False,
        credentials: Vault | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.credentials = credentials  # the real values behind this gate's placeholders
        self.request_deadline = request_deadline
        self.query_values = query_values  # record query values in decisions (URLs carry tokens)
        # Set by the master: mitmproxy's handler per client id, used to close silent connections.
        self.connection_handlers: dict[Any, Any] = {}
        self._deadlines: dict[str, asyncio.TimerHandle] = {}

    # -- the hooks mitmproxy calls: one that raises fails closed -----------------------------------
    #
    # mitmproxy logs an exception raised in an addon hook and carries on with the flow as it
    # stands: a request whose decision raised would be sent upstream undecided and unrecorded (in an
    # inspected tunnel the dial target is already pinned, so ``server_connect`` lets it through), a
    # CONNECT answered 200, a dial made unchecked. Each hook here runs its work and, if that raises,
    # kills the flow (vetoes the dial, refuses the client) instead.

    def client_connected(self, client: connection.Client) -> None:
        try:
            self._client_connected(client)
        except Exception:
            log.exception("the gate failed on a new connection; it is refused")
            client.error = "egress: the gate failed on this connection"

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            await self._http_connect(flow)
        except Exception as exc:
            self._stop_flow(flow, "CONNECT", exc)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            await self._requestheaders(flow)
        except Exception as exc:
            self._stop_flow(flow, "request", exc)

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        try:
            deciding = self._request_done(flow)
        except Exception as exc:
            self._stop_flow(flow, "request body", exc)
            return None
        return None if deciding is None else self._guarded(flow, "request body", deciding)

    async def _guarded(self, flow: http.HTTPFlow, what: str, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:
            self._stop_flow(flow, what, exc)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        try:
            self._responseheaders(flow)
        except Exception as exc:
            self._stop_flow(flow, "response", exc)

    def response(self, flow: http.HTTPFlow) -> None:
        try:
            self._response(flow)
        except Exception as exc:
            self._stop_flow(flow, "response trailers", exc)

    def error(self, flow: http.HTTPFlow) -> None:
        try:
            self._error(flow)
        except Exception:
            log.exception("the gate failed on a failed request; its connection is closed")
            self.close_client(flow.client_conn)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        try:
            self._tls_failed_server(data)
        except Exception:
            log.exception("the gate failed recording an upstream's TLS failure; closing the client")
            conn = self.checkpoint.connections.get(data.context.client.id)
            if conn is not None:
                conn.forget_destinations()
            self.close_client(data.context.client)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            self._server_connect(data)
        except Exception:
            log.exception("the gate failed checking an upstream connection; it is not made")
            data.server.error = "egress: the gate failed checking this destination"

    def _stop_flow(self, flow: http.HTTPFlow, what: str, exc: Exception) -> None:
        """A hook failed: the flow is killed, then the refusal recorded if recording works. What a
        kill keeps back depends on the stage: a CONNECT, a request head or a held body sends
        nothing upstream; a body streamed upstream has gone already, and a response's head (and
        a streamed response's body) may have reached the client - the rest of it does not."""
        log.error("the gate failed on a %s; it is stopped", what, exc_info=exc)
        if flow.killable:
            flow.kill()
        else:
            self.close_client(flow.client_conn)
        try:
            conn = self.checkpoint.connections.get(flow.client_conn.id)
            if conn is not None:
                self.checkpoint.refuse_connection(
                    conn,
                    Reason.UNSUPPORTED,
                    f"the gate failed on a {what} ({type(exc).__name__}); "
                    + _STOPPED.get(what, "it was stopped"),
                )
        except Exception:
            log.exception("recording the refusal of a failed %s failed", what)

    # -- connection lifecycle ------------------------------------------------------------------

    def _client_connected(self, client: connection.Client) -> None:
        since = accepted_at.get()  # set when the tunnel front end accepted it and handed it on
        _, refusal = self.checkpoint.connected(
            client.id,
            _peer(client),
            current_sandbox.get(),
            rated=since is None,
            handed=handed_over.get(),
        )
        if refusal is not None:
            client.error = "egress: too many connections from this client"
            return
        self._arm_deadline(client, since=since)

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

    def head_started(self, client: connection.Client) -> None:
        """The first bytes of a request head: the whole head must follow within the deadline, on
        every request of a keep-alive connection (a connection's first head is already timed from
        its start)."""
        if client.id not in self._deadlines:
            self._arm_deadline(client)

    def refuse_head(self, client: connection.Client, reason: Reason, detail: str) -> None:
        """A request head mitmproxy's parser or the head cap refused before any hook saw it."""
        conn = self.checkpoint.connections.get(client.id)
        if conn is not None:
            self.checkpoint.refuse_connection(conn, reason, detail)

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

    async def _http_connect(self, flow: http.HTTPFlow) -> None:
        self.request_started(flow.client_conn)
        conn = self._conn(flow.client_conn)
        credential = flow.request.headers.pop("proxy-authorization", None)
        request = Request(Kind.CONNECT, flow.request.host, flow.request.port, "CONNECT")
        decision = await self.checkpoint.admit(conn, request, credential=credential)
        if not decision.allowed:
            flow.response = refusal_response(decision)
            return
        self.checkpoint.opened(conn, decision)
        conn.closer = functools.partial(self.close_client, flow.client_conn)
        self._arm_deadline(flow.client_conn)  # now for the tunnel's first bytes

    # -- HTTP requests -------------------------------------------------------------------------

    async def _requestheaders(self, flow: http.HTTPFlow) -> None:
        self.request_started(flow.client_conn)
        req = flow.request
        strip_egress_headers(req.headers)
        conn = self._conn(flow.client_conn)
        credential = req.headers.pop("proxy-authorization", None)
        tunnel = conn.tunnel
        if conn.inspected and tunnel is not None and flow.client_conn.tls_established:
            # Inside an inspected tunnel: the tunnel's host, identity and pinned address; the
            # request must name that host (a proxy credential here is the origin's business: dropped).
            request = self._request(Kind.REQUEST, tunnel.host, tunnel.port, flow)
            problem = _refused_by_parser(flow) or head_problem(
                req.method, req.path, req.headers.fields
            )
            outcome = await self.checkpoint.admit_request(
                conn,
                request,
                problem=problem or _inspected_framing(req, tunnel),
                carried=self._carried(req),
            )
        else:
            request = self._request(Kind.HTTP, req.host, req.port, flow)
            problem = _refused_by_parser(flow) or plain_problem(
                req.method,
                req.path,
                req.scheme,
                req.host,
                req.port,
                req.headers.fields,
                req.headers.get_all("host"),
                req.authority or None,  # only left set for absolute-form targets inside a tunnel
            )
            outcome = await self.checkpoint.admit_request(
                conn, request, credential=credential, problem=problem, carried=self._carried(req)
            )
        if isinstance(outcome, BodyNeeded):
            # Held, bounded and unsent (GateStream) until ``request`` decides with the body.
            req.stream = False
            flow.metadata[HELD] = HOLD_LIMIT
            flow.metadata[_PENDING] = request
            return
        self._enforce(flow, conn, request, outcome)

    def _request(self, kind: Kind, host: str, port: int | None, flow: http.HTTPFlow) -> Request:
        req = flow.request
        fields = req.headers.fields
        sent = fields
        multiplexed = req.is_http2 or req.is_http3
        if multiplexed:
            # sent upstream as the client wrote them, beside the fields: part of an approval's
            # question as the fields are (their canonical forms alone are checked)
            pseudo = ((b":authority", req.authority), (b":scheme", req.scheme))
            sent = (*((k, v.encode("utf-8", "surrogateescape")) for k, v in pseudo), *fields)
        return http_request(
            kind,
            host,
            port,
            req.method,
            req.path,
            fields,
            query_values=self.query_values,
            multiplexed=multiplexed and not flow.metadata.get(ENDED, False),
            sent=sent,
        )

    def _request_done(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The body of a held request has arrived (nothing of it was sent): decide it now. Most
        requests were decided at their head: no coroutine for them."""
        pending: Request | None = flow.metadata.pop(_PENDING, None)
        if pending is None and self.credentials is not None:
            self._check_body(flow)
        if pending is None or pending.http is None or flow.response is not None:
            return None
        return self._decide_body(flow, pending)

    async def _decide_body(self, flow: http.HTTPFlow, pending: Request) -> None:
        assert pending.http is not None
        flow.metadata.pop(HELD, None)
        conn = self._conn(flow.client_conn)
        if flow.metadata.pop(OVERFLOW, False):
            head = pending.http.with_body(None, overflow=True)
        else:
            head = pending.http.with_body(flow.request.raw_content or b"")
        decision = await self.checkpoint.admit_body(
            conn, replace(pending, http=head), carried=self._carried(flow.request, head.body)
        )
        self._enforce(flow, conn, pending, decision)

    def _enforce(
        self, flow: http.HTTPFlow, conn: Connection, request: Request, decision: Decision
    ) -> None:
        req = flow.request
        if not decision.allowed:
            # A body still to come is read and dropped (GateStream), never streamed upstream.
            req.stream = False
            status = None
            if decision.reason is Reason.HOST_MISMATCH and req.is_http2:
                status = 421  # Misdirected Request: this connection cannot serve that authority
            flow.response = refusal_response(decision, status)
            return
        flow.metadata[_ALLOWED] = request
        if self.credentials is not None:
            self._credentials(flow, conn, decision)
        if request.kind is Kind.REQUEST:
            return  # the tunnel's upstream is already pinned, and counted
        self.checkpoint.opened(conn, decision)
        if decision.address is not None:
            # Pin by rewriting only the dial target; the Host header the client sent stays intact.
            # mitmproxy reuses upstream connections keyed by (host, port), so keep-alive keeps working.
            req.data.host = decision.address

    def _responseheaders(self, flow: http.HTTPFlow) -> None:
        conn = self.checkpoint.connections.get(flow.client_conn.id)
        response = flow.response
        if response is not None:
            allowed: Request | None = flow.metadata.get(_ALLOWED)
            problem = switch_problem(
                allowed is not None and allowed.http is not None and allowed.http.websocket,
                flow.request.method,
                response.status_code,
                response.headers.get("upgrade"),
            )
            if problem is not None:
                self._refuse_switch(flow, conn, allowed, problem)
                return
        if self.credentials is not None and conn is not None:
            creds.scrub_response(flow, self.credentials, conn.sandbox_id)

    def _refuse_switch(
        self, flow: http.HTTPFlow, conn: Connection | None, allowed: Request | None, detail: str
    ) -> None:
        """The flow killed, then the refusal recorded: mitmproxy sends nothing of the response and
        closes the client's connection (an HTTP/2 client's stream), so no relay ever opens, even
        when recording fails."""
        if flow.killable:
            flow.kill()
        else:  # never seen in responseheaders; fail closed all the same
            self.close_client(flow.client_conn)
        if conn is not None:
            req = flow.request
            request = allowed or self._request(Kind.HTTP, req.host, req.port, flow)
            self.checkpoint.refuse_switch(conn, request, detail)

    def _error(self, flow: http.HTTPFlow) -> None:
        """Before mitmproxy answers a failed request with its error text: a bound host's failure
        that quotes a real value ends the client's stream instead."""
        if self.credentials is None or not flow.metadata.get(creds.SCRUB):
            return
        conn = self.checkpoint.connections.get(flow.client_conn.id)
        creds.stop_quoted_error(flow, self.credentials, conn.sandbox_id if conn else None)

    def _response(self, flow: http.HTTPFlow) -> None:
        """After the body, before the trailers are sent on: a bound host's trailers are scrubbed
        (on a flow whose connection is unknown, dropped: a scrubbed flow always has one)."""
        if self.credentials is None or flow.response is None or not flow.response.trailers:
            return
        conn = self.checkpoint.connections.get(flow.client_conn.id)
        if conn is not None:
            creds.scrub_trailers(flow, self.credentials, conn.sandbox_id)
        elif flow.metadata.get(creds.SCRUB):
            flow.response.trailers = None

    # -- credentials (the checkpoint's step 3b decides; these only apply it) ---------------------

    def _carried(self, req: http.Request, body: bytes | None = None) -> Carried | None:
        if self.credentials is None:
            return None
        return creds.carried(req, body)

    def _credentials(self, flow: http.HTTPFlow, conn: Connection, decision: Decision) -> None:
        """An admitted request: to a bound host (on any port, inspected or plain HTTP: a service
        that kept a header sent to one of its ports can show it on another), mark what comes back
        for scrubbing; then swap in the credential it uses; remember the allow so that a body
        buffered later is checked for placeholders. In that order, and a failure kills the flow:
        a real value never goes out with its answer left unscrubbed."""
        assert self.credentials is not None
        flow.metadata[_ADMITTED] = decision
        try:
            if decision.kind in (Kind.REQUEST, Kind.HTTP):
                bound = self.credentials.credentials().bound_to(decision.host, conn.sandbox_id)
                if bound:
                    creds.prepare_scrub(flow)
            if decision.credential:
                creds.swap(flow, self.credentials, conn.sandbox_id, decision.credential)
        except Exception:
            log.exception("the credential step of a request to %s failed", decision.host)
            if flow.killable:
                flow.kill()

    def _check_body(self, flow: http.HTTPFlow) -> None:
        """A body buffered (not streamed) after its head was admitted: refused if it carries a
        placeholder; nothing of the request has been sent yet."""
        admitted: Decision | None = flow.metadata.pop(_ADMITTED, None)
        body = flow.request.raw_content
        if admitted is None or flow.response is not None or flow.request.stream or not body:
            return
        conn = self._conn(flow.client_conn)
        refusal = self.checkpoint.credential_body(conn, admitted, body)
        if refusal is not None:
            flow.response = refusal_response(refusal)

    def _tls_failed_server(self, data: tls.TlsData) -> None:
        """An inspected tunnel's upstream did not verify: a refusal on record, never a fallback."""
        conn = self.checkpoint.connections.get(data.context.client.id)
        if conn is None or conn.tunnel is None:
            return
        self.checkpoint.refuse_upstream(
            conn, f"TLS to the upstream failed: {escape(data.conn.error or 'handshake failed')}"
        )

    # -- the choke point -----------------------------------------------------------------------

    def _server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
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

    def state_of(self, client: connection.Client) -> Connection | None:
        """The connection's state if the gate knows it (the HTTP layer counts bytes on it)."""
        return self.checkpoint.connections.get(client.id)


def _refused_by_parser(flow: http.HTTPFlow) -> Problem | None:
    """mitmproxy shows the hook a request it has already refused (ambiguous framing - two lengths,
    a length and a transfer coding -, a bad scheme) and then answers 400 itself: recorded as the
    refusal it is, never as an allow (threat 16, request smuggling)."""
    if flow.error is None:
        return None
    said = flow.error.msg.partition(", refusing")[0]
    return Reason.BAD_REQUEST, f"the request head was refused as malformed: {escape(said)}"


def _inspected_framing(req: http.Request, tunnel: Decision) -> Problem | None:
    """Every authority a request inside an inspected tunnel names (Host, HTTP/2 ``:authority``, an
    absolute-form target) must be the tunnel's host and port; it must name one."""
    hosts = req.headers.get_all("host")
    if len(hosts) > 1:
        return Reason.HOST_MISMATCH, f"{len(hosts)} Host headers; send exactly one"
    named = [(value, "Host header") for value in hosts]
    if req.authority:
        named.append((req.authority, ":authority" if req.is_http2 else "request target"))
    if not named:
        return Reason.HOST_MISMATCH, "the request names no host (no Host header or :authority)"
    return authority_problem(tunnel.host, tunnel.port or 443, named)


def _peer(client: connection.Client) -> str | None:
    peer = client.peername
    return f"{peer[0]}:{peer[1]}" if peer else None


def _is_ip(host: str) -> bool:
    try:
        return not isinstance(canonical_host(host), str)
    except InvalidHost:
        return False
