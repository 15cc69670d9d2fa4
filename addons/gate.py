"""The gate: adapts mitmproxy hook events to the pure decision core and enforces what it returns.

Every hook follows the same shape: build a plain :class:`proxy.core.decision.Request`, ask
:func:`proxy.core.engine.decide`, check the destination (resolve, refuse internal addresses, pin), pass the
decision through the single :class:`proxy.evidence.emit.Emitter` (which may still turn it into a deny when the audit
journal cannot be written), then enforce the decision the emitter returned.

Where each kind of traffic is decided:
- CONNECT tunnels in ``http_connect``, before any upstream connection exists (connection_strategy=lazy).
- The first bytes inside an allowed tunnel in ``next_layer`` (see :mod:`addons.layers`): the ClientHello's
  SNI must name the CONNECT host; no SNI, Encrypted Client Hello or non-TLS bytes close the tunnel.
- Plain-HTTP requests in ``requestheaders``, on the URL authority; a disagreeing Host header is refused.
- ``server_connect`` is the last line: it only lets mitmproxy dial an address this addon checked and pinned
  for that client connection. Anything else is vetoed, so a code path we did not foresee fails closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from addons.refusal import refusal_response, strip_egress_headers
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.engine import decide, refuse, render_host
from proxy.core.hosts import InvalidHost, canonical_host, split_authority
from proxy.destinations.resolver import Destination, DestinationRefused
from proxy.evidence.emit import Emitter
from proxy.policy.identities import Identities
from proxy.policy.model import Policy

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 512
DEFAULT_REQUEST_DEADLINE = 30.0  # seconds for a request head, or a tunnel's first bytes

# Set by the listener that accepted a connection (a per-sandbox socket), read once in client_connected.
current_sandbox: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "egress_sandbox", default=None
)


class Destinations(Protocol):
    """What the gate needs from the resolver: a checked, pinnable address or a refusal."""

    async def destination(self, host: Any, port: int, allow_internal: Any) -> Destination: ...


class Observer(Protocol):
    """Facts that are not decisions (``proxy.evidence.wiring.Evidence`` implements this)."""

    def connection_opened(self, kind: Kind | str = ...) -> None: ...

    def connection_closed(
        self, decision: Decision, *, bytes_out: int, bytes_in: int, duration: float
    ) -> None: ...

    def observe_latency(self, kind: Kind, seconds: float) -> None: ...

    def active_sandboxes(self, count: int) -> None: ...


@dataclass(slots=True)
class ClientState:
    """What the gate knows about one client connection, kept for the connection's lifetime."""

    sandbox_id: str | None
    policy: Callable[[], Policy] | None = None  # per-sandbox policy once the client is identified
    authenticated: bool = False  # attributed by the per-sandbox listener that accepted it
    started: float = field(default_factory=time.monotonic)
    limit_key: str = ""  # what the per-client connection cap counts (sandbox id or peer address)
    deadline: asyncio.TimerHandle | None = None  # closes the connection if it stays silent
    tunnel: Decision | None = None  # the allowed CONNECT decision, once there is one
    opened: Decision | None = None  # the decision a counted upstream connection was opened under
    bytes_out: int = 0  # client -> upstream, counted by the tunnel relay layer
    bytes_in: int = 0
    pinned: dict[tuple[str, int], str] = field(default_factory=dict)  # (host, port) -> checked ip
    checked: set[tuple[str, int]] = field(default_factory=set)  # (ip, port) pairs we may dial


class GateAddon:
    """mitmproxy addon enforcing the allowlist on CONNECT, tunnel contents and plain HTTP."""

    def __init__(
        self,
        policy: Callable[[], Policy],
        emitter: Emitter,
        destinations: Destinations,
        *,
        sandbox_id: str | None = None,
        observer: Observer | None = None,
        identities: Identities | None = None,
        sandbox_policies: dict[str, Callable[[], Policy]] | None = None,
        max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        request_deadline: float = DEFAULT_REQUEST_DEADLINE,
    ) -> None:
        self._policy = policy
        self.max_connections_per_client = max_connections_per_client
        self.request_deadline = request_deadline
        self._per_client: collections.Counter[str] = collections.Counter()
        # Set by the master: mitmproxy's handler per client id, used to close silent connections.
        self.connection_handlers: dict[Any, Any] = {}
        self.observer = observer
        self.identities = identities
        self.sandbox_policies = sandbox_policies or {}
        self.emitter = emitter
        self.destinations = destinations
        self.default_sandbox_id = sandbox_id
        self.clients: dict[str, ClientState] = {}
        # The gate's own listeners (proxy, DNS, metrics): never a destination.
        self.own_endpoints: set[tuple[str, int]] = set()
        self._live_sandboxes: collections.Counter[str] = collections.Counter()

    def _sandbox_joined(self, sandbox_id: str | None) -> None:
        if sandbox_id is not None:
            self._live_sandboxes[sandbox_id] += 1
            self._report_sandboxes()

    def _sandbox_left(self, sandbox_id: str | None) -> None:
        if sandbox_id is not None and self._live_sandboxes[sandbox_id] > 0:
            self._live_sandboxes[sandbox_id] -= 1
            if not self._live_sandboxes[sandbox_id]:
                del self._live_sandboxes[sandbox_id]
            self._report_sandboxes()

    def _report_sandboxes(self) -> None:
        if self.observer is not None:
            self.observer.active_sandboxes(len(self._live_sandboxes))

    def protect_endpoint(self, host: str, port: int) -> None:
        """Never dial one of the gate's own listeners, even where the policy opens loopback
        (threat 10: reaching the proxy through itself, or its metrics/admin ports)."""
        self.own_endpoints.add((host, port))

    def _own_endpoint(self, address: str, port: int) -> bool:
        for host, own_port in self.own_endpoints:
            if own_port != port:
                continue
            if host == address:
                return True
            if host in ("0.0.0.0", "::", "") and ipaddress.ip_address(address).is_private:
                return True  # a wildcard listener answers on every local (and so internal) address
            if ipaddress.ip_address(address).is_loopback and ipaddress.ip_address(host).is_loopback:
                return True
        return False

    # -- connection lifecycle ------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        listener_sandbox = current_sandbox.get()
        sandbox = listener_sandbox or self.default_sandbox_id
        peer = client.peername[0] if client.peername else "?"
        state = self.clients[client.id] = ClientState(
            sandbox_id=sandbox,
            policy=self.sandbox_policies.get(sandbox) if sandbox else None,
            authenticated=listener_sandbox is not None,
            limit_key=f"sandbox:{sandbox}" if listener_sandbox else f"peer:{peer}",
        )
        self._sandbox_joined(sandbox)
        self._per_client[state.limit_key] += 1
        if self._per_client[state.limit_key] > self.max_connections_per_client:
            # Threat 13: one sandbox cannot exhaust the gate's sockets and memory for the others.
            client.error = "egress: too many connections from this client"
            self._refuse_connection(
                client,
                state,
                Reason.CONNECTION_LIMIT,
                f"more than {self.max_connections_per_client} concurrent connections from this client",
            )
            return
        self._arm_deadline(client, state)

    def _arm_deadline(self, client: connection.Client, state: ClientState) -> None:
        """A connection must deliver a complete request head (and a tunnel its first bytes) within
        ``request_deadline`` seconds; a silent or dribbling one is closed (slowloris, threat 13)."""
        if state.deadline is not None:
            state.deadline.cancel()
        if self.request_deadline > 0:
            state.deadline = asyncio.get_running_loop().call_later(
                self.request_deadline, self._deadline_passed, client
            )

    def request_started(self, client: connection.Client) -> None:
        state = self.clients.get(client.id)
        if state is not None and state.deadline is not None:
            state.deadline.cancel()
            state.deadline = None

    def _deadline_passed(self, client: connection.Client) -> None:
        state = self.clients.get(client.id)
        if state is None or client.id not in self.connection_handlers:
            return
        state.deadline = None
        self._refuse_connection(
            client,
            state,
            Reason.REQUEST_TIMEOUT,
            f"no complete request within {self.request_deadline:g} s; the connection was closed",
        )
        self._close_client_transport(client)

    def _close_client_transport(self, client: connection.Client) -> None:
        """Close the client's socket itself. Cancelling mitmproxy's reader task instead races with
        the event it is processing (the cancellation can be swallowed and the socket stays open)."""
        handler = self.connection_handlers.get(client.id)
        io = handler.transports.get(handler.client) if handler is not None else None
        writer = getattr(io, "writer", None)
        if writer is not None and not writer.is_closing():
            writer.close()

    def _refuse_connection(
        self, client: connection.Client, state: ClientState, reason: Reason, detail: str
    ) -> None:
        tunnel = state.tunnel
        request = Request(
            kind=Kind.TLS if tunnel else Kind.CONNECT,
            host=tunnel.host if tunnel else "-",
            port=tunnel.port if tunnel else None,
            client=_peer(client),
            sandbox_id=state.sandbox_id,
        )
        self.emitter.emit(refuse(request, self.policy_for(state), reason, detail))

    def policy_for(self, state: ClientState) -> Policy:
        return (state.policy or self._policy)()

    def _identify(self, flow: http.HTTPFlow, state: ClientState) -> bool:
        """On a shared gate every request must prove its sandbox with a proxy credential. The header is
        always removed so a credential never travels upstream (threat 12)."""
        header = flow.request.headers.pop("proxy-authorization", None)
        if self.identities is None:
            return True
        if header is None:
            # Plain HTTP carries the credential on every request (as Basic proxy auth does);
            # requests inside a CONNECT tunnel inherit the identity the CONNECT proved.
            return state.authenticated or (
                state.tunnel is not None and state.sandbox_id is not None
            )
        sandbox = self.identities.authenticate(header)
        if sandbox is None:
            return False
        if state.sandbox_id is not None and state.sandbox_id != sandbox.id:
            return False  # one connection, one identity: no switching mid-connection
        if state.sandbox_id is None:
            state.sandbox_id = sandbox.id
            self._sandbox_joined(sandbox.id)
        state.policy = self.sandbox_policies.get(sandbox.id)
        return True

    def _auth_refusal(self, flow: http.HTTPFlow, request: Request, state: ClientState) -> None:
        decision = self.emitter.emit(
            refuse(
                request,
                self.policy_for(state),
                Reason.PROXY_AUTH_REQUIRED,
                "this shared gate needs a per-sandbox credential (HTTPS_PROXY=http://ID:TOKEN@host:port)",
            )
        )
        flow.response = refusal_response(decision, status=407)

    def client_disconnected(self, client: connection.Client) -> None:
        state = self.clients.pop(client.id, None)
        if state is None:
            return
        if state.deadline is not None:
            state.deadline.cancel()
        self._per_client[state.limit_key] -= 1
        if self._per_client[state.limit_key] <= 0:
            del self._per_client[state.limit_key]
        self._sandbox_left(state.sandbox_id)
        if state.opened is None:
            return
        duration = time.monotonic() - state.started
        if self.observer is not None:
            self.observer.connection_closed(
                state.opened, bytes_out=state.bytes_out, bytes_in=state.bytes_in, duration=duration
            )
        else:
            self.emitter.event(
                "egress.connection.closed",
                {
                    "egress.decision.id": state.opened.id,
                    "server.address": state.opened.host,
                    "server.port": state.opened.port,
                    "egress.bytes.out": state.bytes_out,
                    "egress.bytes.in": state.bytes_in,
                    "egress.connection.duration": duration,
                },
            )

    def state_of(self, client: connection.Client) -> ClientState:
        state = self.clients.get(client.id)
        if state is None:  # hooks for a connection we never saw connect: track it from now on
            state = self.clients[client.id] = ClientState(sandbox_id=self.default_sandbox_id)
        return state

    # -- CONNECT -------------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        self.request_started(flow.client_conn)
        state = self.state_of(flow.client_conn)
        identified = self._identify(flow, state)
        request = Request(
            kind=Kind.CONNECT,
            host=flow.request.host,
            port=flow.request.port,
            method="CONNECT",
            client=_peer(flow.client_conn),
            sandbox_id=state.sandbox_id,
        )
        if not identified:
            self._auth_refusal(flow, request, state)
            return
        decision = await self._decide_and_pin(request, state)
        if decision.allowed:
            state.tunnel = decision
            self._opened(state, decision)
            self._arm_deadline(flow.client_conn, state)  # now for the tunnel's first bytes
        else:
            flow.response = refusal_response(decision)

    def _opened(self, state: ClientState, decision: Decision) -> None:
        if state.opened is None:
            state.opened = decision
            if self.observer is not None:
                self.observer.connection_opened(decision.kind)

    # -- plain HTTP ----------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.request_started(flow.client_conn)
        strip_egress_headers(flow.request.headers)
        state = self.state_of(flow.client_conn)
        identified = self._identify(flow, state)
        request = Request(
            kind=Kind.HTTP,
            host=flow.request.host,
            port=flow.request.port,
            method=flow.request.method,
            path=flow.request.path.split("?", 1)[0],
            client=_peer(flow.client_conn),
            sandbox_id=state.sandbox_id,
        )
        if not identified:
            self._auth_refusal(flow, request, state)
            return
        problem = self._http_framing_problem(flow, state)
        if problem is not None:
            reason, detail = problem
            decision = self.emitter.emit(refuse(request, self.policy_for(state), reason, detail))
        else:
            decision = await self._decide_and_pin(request, state)
        if not decision.allowed:
            if flow.request.stream:
                # mitmproxy already chose to stream this large body and cannot answer before reading
                # it; close the connection instead of letting the client hang (the decision stands).
                flow.kill()
                self._close_client_transport(flow.client_conn)
                return
            flow.response = refusal_response(decision)
            return
        self._opened(state, decision)
        if content_length := flow.request.headers.get("content-length", ""):
            state.bytes_out += int(content_length) if content_length.isdigit() else 0
        if decision.address is not None:
            # Pin by rewriting only the dial target; the Host header the client sent stays intact.
            # mitmproxy reuses upstream connections keyed by (host, port), so keep-alive keeps working.
            flow.request.data.host = decision.address

    def _http_framing_problem(
        self, flow: http.HTTPFlow, state: ClientState
    ) -> tuple[Reason, str] | None:
        """Refuse requests whose target is ambiguous: every authority an HTTP request names (its Host
        header, an absolute-form target inside a port-80 tunnel) must be the one it is routed to, or a
        server could route it elsewhere than the gate decided (threat 5)."""
        req = flow.request
        if req.scheme != "http":
            return (
                Reason.UNSUPPORTED,
                f"scheme {req.scheme!r} is not proxied as plain HTTP; use CONNECT",
            )
        hosts = req.headers.get_all("host")
        if len(hosts) > 1:
            return Reason.HOST_MISMATCH, f"{len(hosts)} Host headers; send exactly one"
        named: list[tuple[str, str]] = []
        if req.host_header is not None:
            named.append((req.host_header, "Host header"))
        if req.authority:  # only left set for absolute-form targets inside a tunnel
            named.append((req.authority, "request target"))
        for value, what in named:
            try:
                host, port = split_authority(value, req.port)
                same = canonical_host(host) == canonical_host(req.host) and port == req.port
            except (InvalidHost, ValueError):
                return Reason.HOST_MISMATCH, f"the {what} is not a valid host[:port]"
            if not same:
                return (
                    Reason.HOST_MISMATCH,
                    f"the {what} names {render_host(value)} but the request is routed to "
                    f"{req.host}:{req.port}",
                )
        return None

    # -- shared decision path ------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.clients.get(flow.client_conn.id)
        if state is not None and flow.response is not None:
            length = flow.response.headers.get("content-length", "")
            state.bytes_in += int(length) if length.isdigit() else 0

    async def _decide_and_pin(self, request: Request, state: ClientState) -> Decision:
        """Policy first, then the destination check, then the emitter; returns what must be enforced."""
        started = time.perf_counter()
        policy = self.policy_for(state)
        decision = decide(request, policy)
        if decision.allowed and request.port is not None:
            try:
                dest = await self.destinations.destination(
                    canonical_host(decision.host), request.port, policy.allow_internal
                )
            except DestinationRefused as exc:
                decision = decision.with_(
                    decision=Verdict.DENY,
                    reason=exc.reason,
                    detail=exc.detail,
                    address=exc.address,
                )
            except InvalidHost as exc:  # engine already canonicalised; never trust that silently
                decision = decision.with_(
                    decision=Verdict.DENY, reason=Reason.INVALID_HOST, detail=str(exc)
                )
            else:
                decision = decision.with_(address=dest.address)
                if self._own_endpoint(dest.address, request.port):
                    decision = decision.with_(
                        decision=Verdict.DENY,
                        reason=Reason.INTERNAL_ADDRESS,
                        detail=f"{dest.address}:{request.port} is this gate's own listener",
                    )
        decision = self.emitter.emit(decision)
        if self.observer is not None:
            self.observer.observe_latency(request.kind, time.perf_counter() - started)
        if decision.allowed and decision.address is not None and request.port is not None:
            state.pinned[(decision.host, request.port)] = decision.address
            state.pinned[(_lower(request.host), request.port)] = decision.address
            state.checked.add((decision.address, request.port))
        return decision

    # -- the choke point -----------------------------------------------------------------------

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Only dial addresses this gate checked for this client; rewrite names to their pinned address."""
        address = data.server.address
        state = self.clients.get(data.client.id)
        if address is None or state is None:
            data.server.error = "egress: destination was not checked by the gate"
            return
        host, port = str(address[0]), int(address[1])
        pinned = state.pinned.get((_lower(host), port))
        if pinned is not None:
            data.server.address = (pinned, port)
            if data.server.sni is None and not _is_ip(host):
                data.server.sni = host
            return
        if (host, port) in state.checked:
            return
        data.server.error = (
            f"egress: refusing to dial {host}:{port}, it was not checked by the gate"
        )
        log.error("vetoed an unchecked upstream connection to %s:%s", host, port)

    # -- used by the tunnel layer decider --------------------------------------------------------

    def tunnel_of(self, client: connection.Client) -> Decision | None:
        state = self.clients.get(client.id)
        return state.tunnel if state else None

    def decide_tunnel_contents(
        self,
        client: connection.Client,
        tunnel: Decision,
        *,
        sni: str | None = None,
        violation: tuple[Reason, str] | None = None,
    ) -> Decision:
        """Decide the first bytes of a tunnel: a protocol violation found by the layer decider, or the
        ClientHello's SNI checked against the CONNECT host by the engine."""
        state = self.state_of(client)
        request = Request(
            kind=Kind.TLS,
            host=tunnel.host,
            port=tunnel.port,
            sni=sni,
            client=_peer(client),
            sandbox_id=state.sandbox_id,
        )
        policy = self.policy_for(state)
        if violation is not None:
            decision = refuse(request, policy, violation[0], violation[1], rule=tunnel.rule)
        else:
            decision = decide(request, policy)
        if decision.allowed:
            decision = decision.with_(address=tunnel.address)
        decision = self.emitter.emit(decision)
        if not decision.allowed:
            # The tunnel is refused: nothing may be dialled for it any more.
            state.pinned.clear()
            state.checked.clear()
            state.tunnel = None
        return decision


def _peer(client: connection.Client) -> str | None:
    peer = client.peername
    return f"{peer[0]}:{peer[1]}" if peer else None


def _lower(host: str) -> str:
    return host.lower().rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        return not isinstance(canonical_host(host), str)
    except InvalidHost:
        return False
