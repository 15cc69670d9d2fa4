"""What the launcher needs from a gate it runs in its own process for one sandbox, and no more.

Building that gate (mitmproxy, the adapters, the resolver, the DNS gate) is the app layer's job: it
hands the launcher a :data:`GateStarter`, so the sandbox layer never imports the adapters and
``egress run --proxy`` or ``--gate-socket`` never pays for importing them.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from proxy.sandbox.trust import Trust, TrustSetup

if TYPE_CHECKING:
    from proxy.evidence.emit import Emitter
    from proxy.policy.model import Policy


@dataclass(frozen=True)
class GateRequest:
    policy: Policy
    emitter: Emitter
    observer: Any  # the evidence sinks' observer (metrics, journal), or None
    nameservers: Sequence[str] | None  # upstream DNS for destination checks; None: resolv.conf
    sandbox_id: str
    hosts_file: str | None = "/etc/hosts"  # names resolved before DNS; None: DNS only
    state_dir: str | None = None  # the gate's own files (its CA); None: the user's default
    # The sandbox's own listeners, created inside its network namespace: "proxy", and "dns-udp" with
    # "dns-tcp" when it has DNS. Empty under --no-isolation.
    sockets: Mapping[str, socket.socket] = field(default_factory=dict)
    # The gate always listens on host loopback too. Only under --no-isolation is that listener the
    # command's; otherwise whatever connects there is some other local process (threat 12).
    host_listener_is_sandbox: bool = False
    # Pending approvals are announced on stderr with the command that answers them; True: as JSON.
    json_notices: bool = False
    # The credentials the gate swaps in for this sandbox's placeholders (a CredentialStore), or None.
    credentials: Any = None
    # Attribution: the sandbox helper's host pid (its processes and network namespace are searched
    # for each connection's owner) and the proxy port inside; None under --no-isolation.
    sandbox_pid: int | None = None
    proxy_port: int = 0
    # What every decision carries (proxy.attribution.stamp.SandboxFacts): user, context, trace.
    facts: Any = None
    # The run's trust was set up before its sandbox existed (the CA installed in the state
    # directory, the upstream trust written there): the gate, which may start after its command,
    # reads no file the command could have replaced since.
    trust_prepared: bool = False


class PrivateGate(Protocol):
    """A started gate: its host-loopback address, and a stop that releases everything it holds."""

    @property
    def listen_address(self) -> tuple[str, int]: ...

    def in_flight(self) -> int:
        """Connections and DNS questions taken and not yet ended (their decisions may still be
        coming)."""
        ...

    async def sandbox_ended(self) -> None:
        """The sandbox has exited: what waits on its behalf for a person (approvals) ends now."""
        ...

    async def stop(self) -> None: ...


# Starts a gate serving ``request.sockets``; raises (having released what it took) if it cannot.
GateStarter = Callable[[GateRequest], Awaitable[PrivateGate]]


__all__ = ["GateRequest", "GateStarter", "PrivateGate", "Trust", "TrustSetup"]
