"""The gate ``egress run`` and ``egress doctor`` start in their own process for one sandbox.

mitmproxy, the adapters, the resolver and the DNS gate are imported when a private gate starts, not
when this module is imported: ``egress run --proxy`` and ``--gate-socket`` never load them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from proxy.sandbox.private_gate import GateRequest, PrivateGate


class _Running:
    def __init__(self, gate: Any) -> None:
        self.gate = gate
        self.dns: Any = None

    @property
    def listen_address(self) -> tuple[str, int]:
        address: tuple[str, int] = self.gate.listen_address
        return address

    async def stop(self) -> None:
        if self.dns is not None:
            self.dns.close()
            with contextlib.suppress(Exception):
                await self.dns.wait_closed()
        with contextlib.suppress(Exception):
            await self.gate.stop()


async def start_private_gate(request: GateRequest) -> PrivateGate:
    """Serve the sandbox's listeners; the gate's own host-loopback listener attributes decisions to
    the sandbox only when the request says that listener is the command's (--no-isolation)."""
    from addons.master import Gate, GateConfig
    from proxy.app import statedir
    from proxy.destinations.dnsgate import DnsGate
    from proxy.destinations.resolver import Resolver

    sockets = request.sockets
    resolver = Resolver(
        nameservers=list(request.nameservers) if request.nameservers else None,
        hosts_file=request.hosts_file,
    )
    chosen = Path(request.state_dir) if request.state_dir else statedir.default_state_dir()
    state = statedir.prepare_state_dir(chosen)
    gate = Gate(
        GateConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            sandbox_id=request.sandbox_id if request.host_listener_is_sandbox else None,
            confdir=str(statedir.mitmproxy_confdir(state)),
        ),
        lambda: request.policy,
        request.emitter,
        resolver,
        observer=request.observer,
    )
    running = _Running(gate)
    try:
        await gate.start(layers=False)  # mitmproxy starts when a connection first needs it
        if "proxy" in sockets:
            await gate.add_listener(sockets["proxy"], sandbox_id=request.sandbox_id)
        if "dns-udp" in sockets:
            running.dns = DnsGate(
                lambda: request.policy, resolver, request.emitter, sandbox_id=request.sandbox_id
            )
            await running.dns.serve_udp(sock=sockets["dns-udp"])
            await running.dns.serve_tcp(sock=sockets["dns-tcp"])
    except BaseException:
        await running.stop()
        raise
    return running
