"""The gate ``egress run`` and ``egress doctor`` start in their own process for one sandbox.

mitmproxy, the adapters, the resolver and the DNS gate are imported when a private gate starts, not
when this module is imported: ``egress run --proxy`` and ``--gate-socket`` never load them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.app.ca import CaError, Inspection
from proxy.sandbox.private_gate import GateRequest, PrivateGate, Trust, TrustSetup

if TYPE_CHECKING:
    from proxy.policy.model import Policy


class _Running:
    def __init__(self, gate: Any, sandbox_id: str) -> None:
        self.gate = gate
        self.sandbox_id = sandbox_id
        self.dns: Any = None
        self.approvals: Any = None
        self.token_file: Path | None = None
        self.channel: Any = None
        self.processes: Any = None

    @property
    def listen_address(self) -> tuple[str, int]:
        address: tuple[str, int] = self.gate.listen_address
        return address

    async def sandbox_ended(self) -> None:
        """Nobody is left to read an answer: the gate writes nothing more to the sandbox's
        connections (it still decides and records what they left), and the sandbox's pending
        approvals close at once (``sandbox-ended``), the requests they held refused and recorded."""
        self.gate.checkpoint.connections.sandbox_gone(self.sandbox_id)
        if self.approvals is not None:
            try:
                await self.approvals.broker.sandbox_ended(self.sandbox_id)
            except Exception:
                import logging  # not at the top: the launcher imports this module before its fork

                logging.getLogger(__name__).exception(
                    "could not close the pending approvals of %s", self.sandbox_id
                )

    def in_flight(self) -> int:
        in_flight: int = self.gate.in_flight()
        return in_flight + (self.dns.in_flight() if self.dns is not None else 0)

    async def stop(self) -> None:
        if self.dns is not None:
            self.dns.close()
            with contextlib.suppress(Exception):
                await self.dns.wait_closed()
        with contextlib.suppress(Exception):
            await self.gate.stop()
        if self.approvals is not None:
            with contextlib.suppress(Exception):
                await self.approvals.close()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close()
        if self.token_file is not None:
            with contextlib.suppress(OSError):
                self.token_file.unlink()
        if self.processes is not None:
            self.processes.close()


async def start_private_gate(
    request: GateRequest, inspection: Inspection | None = None
) -> PrivateGate:
    """Serve the sandbox's listeners; the gate's own host-loopback listener attributes decisions to
    the sandbox only when the request says that listener is the command's (--no-isolation)."""
    from addons.master import Gate, GateConfig
    from proxy.app import statedir
    from proxy.app.ca import ensure_ca, upstream_trust
    from proxy.attribution.channel import open_channel
    from proxy.destinations.dnsgate import DnsGate
    from proxy.destinations.resolver import Resolver

    sockets = request.sockets
    resolver = Resolver(
        nameservers=list(request.nameservers) if request.nameservers else None,
        hosts_file=request.hosts_file,
    )
    inspection = inspection or Inspection()
    chosen = request.state_dir or inspection.state_dir
    state = statedir.prepare_state_dir(Path(chosen) if chosen else statedir.default_state_dir())
    confdir = statedir.mitmproxy_confdir(state)
    if request.trust_prepared:  # installed and written before the sandbox existed: not read again
        ensure_ca(confdir)
        trust = upstream_trust(confdir, inspection.upstream_ca, written=True)
    else:
        ensure_ca(confdir, inspection.ca_cert, inspection.ca_key)
        trust = upstream_trust(confdir, inspection.upstream_ca)
    approvals, token_file = await _start_approvals(request, state)
    emitter, processes, facts = _attribution(request)
    gate = Gate(
        GateConfig(
            listen_host="127.0.0.1",
            listen_port=0,
            sandbox_id=request.sandbox_id if request.host_listener_is_sandbox else None,
            confdir=str(confdir),
            upstream_ca=trust,
            query_values=inspection.query_values,
        ),
        lambda: request.policy,
        emitter,
        resolver,
        observer=request.observer,
        approvals=approvals.broker if approvals is not None else None,
        credentials=request.credentials,
        processes=processes,
    )
    metrics = getattr(request.observer, "metrics", None)
    if request.credentials is not None and metrics is not None:
        metrics.credentials_loaded(request.credentials.names)
    running = _Running(gate, request.sandbox_id)
    running.approvals, running.token_file = approvals, token_file
    running.processes = processes
    try:
        running.channel = await open_channel(state, request.sandbox_id, facts)
        if approvals is not None and approvals.admin_address is not None:
            gate.protect_endpoint(*approvals.admin_address)
        await gate.start(layers=False)  # mitmproxy starts when a connection first needs it
        if request.policy.reads_requests:
            # ... which an inspected host's first request soon will: start them at the sandbox's
            # first connection, not now, so a command that never connects (and exits at once)
            # does not wait for an import it never needed.
            gate.warm_layers_on_first_connection()
        if "proxy" in sockets:
            await gate.add_listener(sockets["proxy"], sandbox_id=request.sandbox_id)
        if processes is not None:
            gate.checkpoint.start_lookups(processes.warm)
        if "dns-udp" in sockets:
            running.dns = DnsGate(
                lambda: request.policy, resolver, emitter, sandbox_id=request.sandbox_id
            )
            await running.dns.serve_udp(sock=sockets["dns-udp"])
            await running.dns.serve_tcp(sock=sockets["dns-tcp"])
    except BaseException:
        await running.stop()
        raise
    return running


def _attribution(request: GateRequest) -> tuple[Any, Any, Any]:
    """The emitter that stamps user, context, trace and process on every decision, and the
    sandbox's process lookup (only with a sandbox to search: not under --no-isolation)."""
    import os

    from proxy.attribution.procfs import SandboxProcesses
    from proxy.attribution.stamp import SandboxFacts, Stamped
    from proxy.sandbox import SANDBOX_LOOPBACK

    facts = request.facts or SandboxFacts(os.getuid(), None)
    processes = None
    if request.sandbox_pid is not None and "proxy" in request.sockets:
        processes = SandboxProcesses(
            request.sandbox_pid,
            (SANDBOX_LOOPBACK, request.proxy_port),
            diag=request.sockets.get("diag"),
        )
    return Stamped(request.emitter, facts, processes), processes, facts


def sandbox_trust(inspection: Inspection) -> TrustSetup:
    """What ``egress run`` sets up before the sandbox starts: the state directory (and a supplied CA
    key) hidden from it always, and, when the policy inspects anything (or a joined gate's CA is
    given with --ca-cert), a CA bundle to trust: the system's CAs plus the gate's."""

    def setup(policy: Policy | None) -> Trust:
        from proxy.app import statedir
        from proxy.app.ca import ensure_ca, system_bundle, upstream_trust
        from proxy.sandbox.trust import bundle_trust, untrusted

        try:
            inspection.check(issuing=policy is not None)
            hidden: list[str] = []
            chosen = inspection.state_dir
            if policy is not None:  # a private gate: its state directory holds its CA key
                state = statedir.prepare_state_dir(
                    Path(chosen) if chosen else statedir.default_state_dir()
                )
                hidden.append(str(state))
                confdir = statedir.mitmproxy_confdir(state)
                # The supplied CA and upstream CA files are read here, before the sandbox exists:
                # the gate finishes its start after its command has started, and a file the
                # command could replace by then must not become what the gate signs or trusts.
                files = ensure_ca(confdir, inspection.ca_cert, inspection.ca_key)
                if inspection.upstream_ca is not None:
                    upstream_trust(confdir, inspection.upstream_ca)
                gate_cert = files.cert if policy.reads_requests else None
            else:
                if (own := statedir.state_dir_to_hide(chosen)) is not None:
                    hidden.append(str(own))
                gate_cert = Path(inspection.ca_cert) if inspection.ca_cert else None
            if inspection.ca_key is not None:
                hidden.append(inspection.ca_key)
            if gate_cert is None:
                return Trust(bundle=None, hidden=tuple(hidden))
            sources = [p for p in (system_bundle(), gate_cert) if p is not None]
        except (CaError, statedir.StateDirError, OSError) as exc:
            raise untrusted(exc) from exc
        try:
            return bundle_trust(sources, hidden)
        except (OSError, ValueError) as exc:  # ValueError: a path the system cannot take
            raise untrusted(exc) from exc

    return setup


async def _start_approvals(request: GateRequest, state: Path) -> tuple[Any, Path | None]:
    """Approvals when the policy has ask rules (else None: nothing can ask)."""
    from proxy.policy.model import Action

    if not any(rule.action is Action.ASK for rule in request.policy.rules):
        return None, None
    from proxy.approvals.service import private_approvals
    from proxy.approvals.terminal import TerminalNotices

    approvals, token_file = private_approvals(
        state,
        request.sandbox_id,
        as_json=request.json_notices,
        metrics=getattr(request.observer, "metrics", None),
    )
    try:
        await approvals.start(lambda: request.policy)
    except BaseException:
        token_file.unlink(missing_ok=True)
        raise
    base = approvals.admin_base()
    approvals.broker.notifiers.append(
        TerminalNotices(base or "-", str(token_file), as_json=request.json_notices)
    )
    return approvals, token_file
