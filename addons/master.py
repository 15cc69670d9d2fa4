"""The running gate: its listener served by the tunnel front end, and mitmproxy's layers behind it.

CONNECT tunnels that end in a passthrough relay are served by :mod:`addons.tunnels`; everything else is
handed to an embedded mitmproxy with only the addons the gate needs (:mod:`addons.mitm`). That
mitmproxy is started with the gate (``egress serve``) or, for a gate that should be up at once
(``egress run``'s private gate), on the first connection that needs it: importing it is most of a
gate's start-up, and a sandbox that only opens TLS tunnels never needs it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from addons.plainhttp import PlainHttp
from addons.tunnels import TunnelFrontEnd, accepted_at, current_sandbox, handed_over
from proxy.core.checkpoint import (
    Approver,
    Authenticator,
    Checkpoint,
    DecisionSink,
    Destinations,
    Processes,
)
from proxy.core.connections import Connection, Connections, Observer
from proxy.core.credentials import Vault
from proxy.core.destination import DestinationCheck, NameResolver
from proxy.core.hosts import parse_endpoint
from proxy.core.limits import Limits
from proxy.destinations.local import OwnEndpoints
from proxy.policy.model import Policy

if TYPE_CHECKING:
    from addons.mitm import Layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 3128
    sandbox_id: str | None = None
    stream_large_bodies: str = "256k"
    body_size_limit: str | None = None
    limits: Limits = field(default_factory=Limits)
    # mitmproxy's confdir (its TLS layer creates CA files there at start-up); None keeps its
    # ~/.mitmproxy, which a container with a read-only root and no home cannot write.
    confdir: str | None = None
    # The CAs (PEM) inspected tunnels' upstreams are verified against (the app layer passes the
    # system's, plus any extra); None: mitmproxy's default (certifi's bundle).
    upstream_ca: str | None = None
    query_values: bool = False  # record query values in decisions (off: URLs carry tokens)
    # Serve the plain-HTTP requests the front end can serve exactly as mitmproxy would
    # (addons.plainhttp); off: every plain-HTTP connection goes to mitmproxy's layers.
    fast_plain_http: bool = True


def parse_listen(spec: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (loopback); raises ValueError naming the problem."""
    try:
        return parse_endpoint(spec, default_host="127.0.0.1", any_port=True)
    except ValueError as exc:
        raise ValueError(f"--listen {spec!r}: {exc}") from None


def raise_descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard limit and return it: the whole-gate
    connection cap is fitted to it, so running out of descriptors refuses instead of stalling."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit from %d to %d", soft, wanted)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


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
        approvals: Approver | None = None,
        credentials: Vault | None = None,
        processes: Processes | None = None,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.emitter = emitter
        self.own = OwnEndpoints()
        self.checkpoint = Checkpoint(
            policy,
            emitter,
            destinations or DestinationCheck(resolver),
            connections=Connections(
                limits=config.limits.fitted(raise_descriptor_limit()),
                default_sandbox_id=config.sandbox_id,
                sandbox_policies=sandbox_policies,
                observer=observer,
            ),
            identities=identities,
            own=self.own,
            observer=observer,
            approvals=approvals,
            credentials=credentials.credentials if credentials is not None else None,
            processes=processes,
        )
        self.tunnels = TunnelFrontEnd(
            self.checkpoint,
            request_deadline=config.limits.request_timeout,
            idle_timeout=config.limits.idle_timeout,
            handoff=self._to_mitmproxy,
            plain=PlainHttp(
                self.checkpoint,
                idle_timeout=config.limits.idle_timeout,
                query_values=config.query_values,
            )
            if config.fast_plain_http
            else None,
        )
        self.layers: Layers | None = None
        self._layers_started: asyncio.Task[Layers] | None = None
        self._extra: list[asyncio.Task[None]] = []
        self._listener: socket.socket | None = None

    @property
    def master(self) -> Any:
        """mitmproxy's master, once its layers run (None before)."""
        return self.layers.master if self.layers is not None else None

    async def start(self, listener: socket.socket | None = None, *, layers: bool = True) -> None:
        """Listen on ``listener`` if given (pre-bound, e.g. shared by workers), else on the configured
        address. ``layers=False`` starts mitmproxy's layers only when a connection first needs them."""
        self._listener = listener or socket.create_server(
            (self.config.listen_host, self.config.listen_port),
            family=socket.AF_INET6 if ":" in self.config.listen_host else socket.AF_INET,
            backlog=1024,
        )
        own = self._listener.getsockname()
        self.protect_endpoint(str(own[0]), int(own[1]))
        if layers:
            await self._mitmproxy()
        await self.add_listener(self._listener, self.config.sandbox_id)

    async def _mitmproxy(self) -> Layers:
        """mitmproxy's layers, started once; concurrent callers wait for the same start. The import
        runs in a thread so tunnels keep flowing meanwhile."""
        if self._layers_started is None:
            self._layers_started = asyncio.get_running_loop().create_task(self._start_layers())
        return await asyncio.shield(self._layers_started)

    def warm_layers_on_first_connection(self) -> None:
        """Start mitmproxy's layers in the background once the first client connects."""
        self.tunnels.on_first_connection = self.warm_layers

    def warm_layers(self) -> None:
        """Start mitmproxy's layers in the background now, without waiting for them."""
        if self._layers_started is None:
            self._layers_started = asyncio.get_running_loop().create_task(self._start_layers())

    async def _start_layers(self) -> Layers:
        import importlib

        loop = asyncio.get_running_loop()
        mitm = await loop.run_in_executor(None, importlib.import_module, "addons.mitm")
        layers: Layers = await mitm.start_layers(
            self.config, self.checkpoint, credentials=self.credentials
        )
        for host, port in layers.listen_addrs():
            self.protect_endpoint(host, port)
        self.layers = layers
        return layers

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
        self, sock: socket.socket, sandbox_id: str | None, accepted: float, opened: Connection
    ) -> None:
        """A connection the tunnel front end does not take: mitmproxy's layers serve it."""
        try:
            layers = await self._mitmproxy()
        except Exception:
            sock.close()  # fail closed: no layers, no service
            log.exception("mitmproxy's layers did not start")
            return
        current_sandbox.set(sandbox_id)
        accepted_at.set(accepted)
        handed_over.set(opened)
        reader, writer = await asyncio.open_connection(sock=sock)
        await layers.handle_stream(reader, writer)

    async def _drain(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        in_flight = self.in_flight()
        while self.in_flight() and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        left = self.in_flight()
        if in_flight:
            log.warning(
                "drained %d of %d connections in flight; closing %d at the %g s deadline",
                in_flight - left,
                in_flight,
                left,
                seconds,
            )

    def in_flight(self) -> int:
        """Connections being served: the larger of the checkpoint's open connections and the front
        end's connection tasks (each may count a connection the other no longer counts)."""
        return max(self.checkpoint.connections.active, len(self.tunnels.active))

    def remove_listener(self, server: asyncio.Task[None]) -> None:
        listener: socket.socket = server.listener  # type: ignore[attr-defined]
        self.tunnels.stop_serving(listener)  # unregistered before its descriptor is closed
        listener.close()
        server.cancel()
        if server in self._extra:
            self._extra.remove(server)

    async def stop(self, drain: float = 0.0) -> None:
        """Stop accepting; with ``drain``, let the connections in flight finish for up to that many
        seconds first (their decisions and byte counts are recorded as they end), then close the
        rest."""
        if drain > 0:
            self.tunnels.draining = True
        for server in list(self._extra):
            self.remove_listener(server)
        if drain > 0:
            await self._drain(drain)
        self.tunnels.cancel_all()
        if self._layers_started is not None and not self._layers_started.done():
            self._layers_started.cancel()
        if self.layers is not None:
            await self.layers.stop()
