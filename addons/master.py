"""Embedded mitmproxy with only the addons the gate needs.

A bare ``Master`` with the proxy server, our layer decider (in place of NextLayer), TLS config and the gate
measured about +25% new tunnels/s over ``DumpMaster``'s ~34 addons, and nothing else can interfere with
enforcement. ``connection_strategy`` is forced to ``lazy`` and checked: under ``eager`` mitmproxy dials
upstream before the gate has decided.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import exceptions, options
from mitmproxy.addons import errorcheck, proxyserver, tlsconfig
from mitmproxy.master import Master

from addons.gate import GateAddon, current_sandbox
from addons.layers import GateLayers
from proxy.core.checkpoint import (
    Approver,
    Authenticator,
    Checkpoint,
    DecisionSink,
    Destinations,
)
from proxy.core.connections import Connections, Observer
from proxy.core.destination import DestinationCheck, NameResolver
from proxy.core.hosts import parse_endpoint
from proxy.core.limits import Limits
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


class VerifiedUpstreams:
    """Refuses to run with upstream certificate verification off: an inspected tunnel would then
    carry the sandbox's requests to whoever answers (threat 14)."""

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if ctx.options.ssl_insecure:
            raise exceptions.OptionsError(
                "agent-egress never runs with ssl_insecure: upstream certificates are always "
                "verified (add a trust bundle with ssl_verify_upstream_trusted_ca instead)"
            )


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
    ) -> None:
        self.config = config
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
        )
        self.addon = GateAddon(
            self.checkpoint,
            request_deadline=config.limits.request_timeout,
            query_values=config.query_values,
        )
        self.master: Master | None = None
        self._task: asyncio.Task[None] | None = None
        self._extra: list[asyncio.Server] = []

    async def start(self) -> None:
        opts = options.Options(
            mode=["regular"],
            listen_host=self.config.listen_host,
            listen_port=self.config.listen_port,
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
            "ssl_insecure": False,
            "ssl_verify_upstream_trusted_ca": self.config.upstream_ca,
        }
        opts.update(**updates)
        # Added last: their configure() sees the final options and rejects any later switch to
        # eager connections or unverified upstreams.
        master.addons.add(LazyOnly(), VerifiedUpstreams())
        self.master = master
        self._task = asyncio.create_task(master.run(), name="egress-master")
        for _ in range(500):  # bounded: ~10 s for the listener to come up
            if self._task.done():
                await self._task
                raise RuntimeError("the proxy stopped during start-up; see the log above")
            if addrs := self.proxyserver.listen_addrs():
                for addr in addrs:
                    self.protect_endpoint(str(addr[0]), int(addr[1]))
                return
            await asyncio.sleep(0.02)
        raise RuntimeError("the proxy listener did not come up within 10 s")

    def protect_endpoint(self, host: str, port: int) -> None:
        """Never dial one of the gate's own listeners (proxy, DNS, metrics, admin), on any address
        of this host, even where the policy opens internal ranges (threat 10)."""
        self.own.add(host, port)

    @property
    def listen_address(self) -> tuple[str, int]:
        addrs = self.proxyserver.listen_addrs()
        if not addrs:
            raise RuntimeError("the gate is not listening")
        return str(addrs[0][0]), int(addrs[0][1])

    async def add_listener(
        self, sock: socket.socket, sandbox_id: str | None = None
    ) -> asyncio.Server:
        """Serve proxy clients accepted on a pre-bound listening socket (e.g. one created inside a
        sandbox's network namespace), attributing every decision they cause to ``sandbox_id``.
        Returns the server; pass it to :meth:`remove_listener` when the sandbox ends."""
        instance = next(iter(self.proxyserver.servers))

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            current_sandbox.set(sandbox_id)
            await instance.handle_stream(reader, writer)

        sock.setblocking(False)
        server = await asyncio.start_server(handle, sock=sock)
        self._extra.append(server)
        return server

    def remove_listener(self, server: asyncio.Server) -> None:
        server.close()
        if server in self._extra:
            self._extra.remove(server)

    async def stop(self) -> None:
        for server in self._extra:
            server.close()
        self._extra.clear()
        if self.master is not None and self._task is not None:
            self.master.shutdown()
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except TimeoutError:
                self._task.cancel()
