"""Embedded mitmproxy with only the addons the gate needs.

A bare ``Master`` with the proxy server, our layer decider (in place of NextLayer), TLS config and the gate
measured about +25% new tunnels/s over ``DumpMaster``'s ~34 addons, and nothing else can interfere with
enforcement. ``connection_strategy`` is forced to ``lazy`` and checked: under ``eager`` mitmproxy dials
upstream before the gate has decided.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitmproxy import exceptions, options
from mitmproxy.addons import errorcheck, proxyserver, tlsconfig
from mitmproxy.master import Master

from addons.gate import DEFAULT_REQUEST_DEADLINE, GateAddon, accepted_at, current_sandbox
from addons.layers import GateLayers
from addons.tunnels import TunnelFrontEnd
from proxy.core.checkpoint import Authenticator, Checkpoint, DecisionSink, Destinations
from proxy.core.connections import DEFAULT_MAX_CONNECTIONS_PER_CLIENT, Connections, Observer
from proxy.core.destination import DestinationCheck, NameResolver
from proxy.core.hosts import parse_endpoint
from proxy.destinations.local import OwnEndpoints
from proxy.policy.model import Policy

log = logging.getLogger(__name__)


class LazyOnly:
    """Refuses to run unless connection_strategy is lazy (threat 14: never fail open on config)."""

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if ctx.options.connection_strategy != "lazy":
            raise exceptions.OptionsError(
                "agent-egress requires connection_strategy=lazy: under 'eager' mitmproxy connects "
                "upstream before the gate decides"
            )


@dataclass(frozen=True)
class GateConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 3128
    sandbox_id: str | None = None
    stream_large_bodies: str = "256k"
    body_size_limit: str | None = None
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    request_deadline: float = DEFAULT_REQUEST_DEADLINE
    # mitmproxy's confdir (its TLS layer creates CA files there at start-up); None keeps its
    # ~/.mitmproxy, which a container with a read-only root and no home cannot write.
    confdir: str | None = None


def parse_listen(spec: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (loopback); raises ValueError naming the problem."""
    try:
        return parse_endpoint(spec, default_host="127.0.0.1", any_port=True)
    except ValueError as exc:
        raise ValueError(f"--listen {spec!r}: {exc}") from None


class Gate:
    """The running gate: mitmproxy master plus the gate addon, startable inside any asyncio loop.

    ``resolver`` turns names into addresses; the checkpoint screens and pins them. ``destinations``
    replaces that screening step as a whole (tests wrap it in a fence that keeps traffic on loopback)."""

    def __init__(
        self,
        config: GateConfig,
        policy: Callable[[], Policy],
        emitter: DecisionSink,
        resolver: NameResolver,
        *,
        destinations: Destinations | None = None,
        observer: Observer | None = None,
        identities: Authenticator | None = None,
        sandbox_policies: dict[str, Callable[[], Policy]] | None = None,
    ) -> None:
        self.config = config
        self.emitter = emitter
        self.own = OwnEndpoints()
        self.checkpoint = Checkpoint(
            policy,
            emitter,
            destinations or DestinationCheck(resolver),
            connections=Connections(
                max_per_client=config.max_connections_per_client,
                default_sandbox_id=config.sandbox_id,
                sandbox_policies=sandbox_policies,
                observer=observer,
            ),
            identities=identities,
            own=self.own,
            observer=observer,
        )
        self.addon = GateAddon(self.checkpoint, request_deadline=config.request_deadline)
        self.tunnels = TunnelFrontEnd(
            self.checkpoint, request_deadline=config.request_deadline, handoff=self._to_mitmproxy
        )
        self.master: Master | None = None
        self._task: asyncio.Task[None] | None = None
        self._extra: list[asyncio.Task[None]] = []
        self._listener: socket.socket | None = None

    async def start(self, listener: socket.socket | None = None) -> None:
        """Listen on ``listener`` if given (pre-bound, e.g. shared by workers), else on the configured
        address."""
        # The gate's listener is its own socket, served by the tunnel front end (which passes what it
        # does not take to mitmproxy); mitmproxy's own listener is an ephemeral loopback port.
        self._listener = listener or socket.create_server(
            (self.config.listen_host, self.config.listen_port),
            family=socket.AF_INET6 if ":" in self.config.listen_host else socket.AF_INET,
            backlog=1024,
        )
        opts = options.Options(
            mode=["regular"],
            listen_host="127.0.0.1",
            listen_port=0,
            # before the addons are added: TlsConfig creates its CA in confdir as it is configured
            **({"confdir": self.config.confdir} if self.config.confdir else {}),
        )
        master = Master(opts)
        self.proxyserver = proxyserver.Proxyserver()
        self.addon.connection_handlers = self.proxyserver.connections
        master.addons.add(
            self.proxyserver,
            GateLayers(self.addon),
            tlsconfig.TlsConfig(),
            self.addon,
            errorcheck.ErrorCheck(),
        )
        updates: dict[str, Any] = {
            "connection_strategy": "lazy",
            "stream_large_bodies": self.config.stream_large_bodies,
            "body_size_limit": self.config.body_size_limit,
        }
        opts.update(**updates)
        # Added last: its configure() sees the final options and rejects any later switch to eager.
        master.addons.add(LazyOnly())
        self.master = master
        self._task = asyncio.create_task(master.run(), name="egress-master")
        for _ in range(500):  # bounded: ~10 s for the listener to come up
            if self._task.done():
                await self._task
                raise RuntimeError("the proxy stopped during start-up; see the log above")
            if addrs := self.proxyserver.listen_addrs():
                for addr in addrs:
                    self.protect_endpoint(str(addr[0]), int(addr[1]))
                own = self._listener.getsockname()
                self.protect_endpoint(str(own[0]), int(own[1]))
                await self.add_listener(self._listener, self.config.sandbox_id)
                return
            await asyncio.sleep(0.02)
        raise RuntimeError("the proxy listener did not come up within 10 s")

    def protect_endpoint(self, host: str, port: int) -> None:
        """Never dial one of the gate's own listeners (proxy, DNS, metrics, admin), on any address
        of this host, even where the policy opens internal ranges (threat 10)."""
        self.own.add(host, port)

    @property
    def listen_address(self) -> tuple[str, int]:
        if self._listener is None or self._listener.fileno() < 0:
            raise RuntimeError("the gate is not listening")
        addr = self._listener.getsockname()
        return str(addr[0]), int(addr[1])

    async def add_listener(
        self, sock: socket.socket, sandbox_id: str | None = None
    ) -> asyncio.Task[None]:
        """Serve proxy clients accepted on a pre-bound listening socket (e.g. one created inside a
        sandbox's network namespace), attributing every decision they cause to ``sandbox_id``.
        Returns the accept task; pass it to :meth:`remove_listener` when the sandbox ends."""
        task = asyncio.get_running_loop().create_task(self.tunnels.serve(sock, sandbox_id))
        task.listener = sock  # type: ignore[attr-defined]
        self._extra.append(task)
        return task

    async def _to_mitmproxy(
        self, sock: socket.socket, sandbox_id: str | None, accepted: float
    ) -> None:
        """A connection the tunnel front end does not take: mitmproxy's layers serve it."""
        instance = next(iter(self.proxyserver.servers))
        current_sandbox.set(sandbox_id)
        accepted_at.set(accepted)
        reader, writer = await asyncio.open_connection(sock=sock)
        await instance.handle_stream(reader, writer)

    def remove_listener(self, server: asyncio.Task[None]) -> None:
        listener: socket.socket = server.listener  # type: ignore[attr-defined]
        listener.close()
        server.cancel()
        if server in self._extra:
            self._extra.remove(server)

    async def stop(self) -> None:
        for server in list(self._extra):
            self.remove_listener(server)
        if self.master is not None and self._task is not None:
            self.master.shutdown()
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except TimeoutError:
                self._task.cancel()
