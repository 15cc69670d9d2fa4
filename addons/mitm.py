"""Embedded mitmproxy with only the addons the gate needs, for the connections the tunnel front end
hands over (plain HTTP, tunnels whose requests are decided one by one).

A bare ``Master`` with the proxy server, our layer decider (in place of NextLayer), TLS config and the gate
measured about +25% new tunnels/s over ``DumpMaster``'s ~34 addons, and nothing else can interfere with
enforcement. ``connection_strategy`` is forced to ``lazy`` and checked: under ``eager`` mitmproxy dials
upstream before the gate has decided.
"""

from __future__ import annotations

import asyncio
from typing import Any

import addons.mitmaddons  # noqa: F401  (first: mitmproxy's addon modules without its default set)

# isort: split
from mitmproxy import exceptions, options
from mitmproxy.addons import errorcheck, proxyserver, tlsconfig
from mitmproxy.master import Master

from addons.gate import GateAddon
from addons.layers import GateLayers
from proxy.core.checkpoint import Checkpoint
from proxy.core.credentials import Vault


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


class ValidatedHeaders:
    """Refuses to run without mitmproxy's inbound header validation: it is what refuses a request
    whose body length parsers read differently (two lengths, a length and a transfer coding), which
    would let a second request ride past the request rules in the first one's body (threat 16)."""

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if not ctx.options.validate_inbound_headers:
            raise exceptions.OptionsError(
                "agent-egress never runs without validate_inbound_headers: ambiguous request "
                "framing would let requests be smuggled past the request rules"
            )


class NoRawTcp:
    """Refuses to run with mitmproxy's ``rawtcp``: with it, an upstream's ``101 Switching
    Protocols`` to a request that asked for no upgrade turns the connection into a raw relay, and
    the client's next requests reach the upstream past the request rules, unread (and a bound
    host's answers past the credential scrubber). Without it such a connection is closed. The
    gate chooses every other layer itself (``addons.layers``), so nothing else uses the option."""

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if ctx.options.rawtcp:
            raise exceptions.OptionsError(
                "agent-egress never runs with rawtcp: an upstream's protocol switch would carry "
                "the client's requests past the request rules"
            )


class Layers:
    """A running master; its own listener is an ephemeral loopback port nobody is told about."""

    def __init__(self, master: Master, server: proxyserver.Proxyserver, task: Any) -> None:
        self.master = master
        self.proxyserver = server
        self._task: asyncio.Task[None] = task

    def listen_addrs(self) -> list[tuple[str, int]]:
        return [(str(a[0]), int(a[1])) for a in self.proxyserver.listen_addrs()]

    async def handle_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        instance = next(iter(self.proxyserver.servers))
        await instance.handle_stream(reader, writer)

    async def stop(self) -> None:
        self.master.shutdown()
        try:
            await asyncio.wait_for(self._task, timeout=10)
        except TimeoutError:
            self._task.cancel()


async def start_layers(
    config: Any, checkpoint: Checkpoint, *, credentials: Vault | None = None
) -> Layers:
    """Start the master for ``config`` (an :class:`addons.master.GateConfig`)."""
    addon = GateAddon(
        checkpoint,
        request_deadline=config.limits.request_timeout,
        query_values=config.query_values,
        credentials=credentials,
    )
    opts = options.Options(
        mode=["regular"],
        listen_host="127.0.0.1",
        listen_port=0,
        # before the addons are added: TlsConfig creates its CA in confdir as it is configured
        **({"confdir": config.confdir} if config.confdir else {}),
    )
    master = Master(opts)
    server = proxyserver.Proxyserver()
    addon.connection_handlers = server.connections
    master.addons.add(
        server, GateLayers(addon), tlsconfig.TlsConfig(), addon, errorcheck.ErrorCheck()
    )
    opts.update(
        connection_strategy="lazy",
        stream_large_bodies=config.stream_large_bodies,
        body_size_limit=config.body_size_limit,
        ssl_insecure=False,
        validate_inbound_headers=True,
        rawtcp=False,
        ssl_verify_upstream_trusted_ca=config.upstream_ca,
    )
    # Added last: their configure() sees the final options and rejects any later switch to
    # eager connections, unverified upstreams, unvalidated request heads or raw relays.
    master.addons.add(LazyOnly(), VerifiedUpstreams(), ValidatedHeaders(), NoRawTcp())
    task = asyncio.create_task(master.run(), name="egress-master")
    for _ in range(500):  # bounded: ~10 s for the listener to come up
        if task.done():
            await task
            raise RuntimeError("the proxy stopped during start-up; see the log above")
        if server.listen_addrs():
            return Layers(master, server, task)
        await asyncio.sleep(0.02)
    master.shutdown()
    raise RuntimeError("the proxy listener did not come up within 10 s")
