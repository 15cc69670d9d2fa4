"""``egress serve``: the standalone gate process.

Start-up fails closed: a policy that does not load, a listener that cannot bind or an evidence sink that
cannot be opened stops the process with exit 2 and a message, rather than running a gate that enforces
or records less than configured; so does a managed policy (``--managed-policy``) that does not load or
that the local policy exceeds. SIGINT/SIGTERM stop it cleanly: it stops accepting, lets the connections
in flight finish for up to ``--drain-timeout``, closes the rest, flushes its evidence and exits 0.
Edited policy files and SIGHUP reload the policy (a failed reload keeps the old policy and says so:
:mod:`proxy.app.live_reload`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from proxy.app import statedir
from proxy.app.arguments import limits_from
from proxy.app.ca import CaError, Inspection, ensure_ca, upstream_trust
from proxy.app.exits import fail
from proxy.app.lifecycle_args import managed_policy_path
from proxy.destinations.dnsgate import SHARED_INFLIGHT_PER_CLIENT, SHARED_TCP_PER_CLIENT, DnsGate
from proxy.evidence.emit import JsonLineSink, Sink
from proxy.policy.identities import Identities, IdentityError
from proxy.policy.loader import policy_file
from proxy.policy.managed import load_effective, load_with_ceiling
from proxy.policy.model import Policy, PolicyError
from proxy.policy.reload import PolicyHolder
from proxy.runtime.lazy import all_settled
from proxy.runtime.loop import gate_started

log = logging.getLogger("egress")


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # mitmproxy logs every client connect/disconnect at INFO: noise next to our decision lines.
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)


def decision_log_sink(path: str | None) -> Sink:
    return JsonLineSink(path=path) if path else JsonLineSink(stream=sys.stderr)


def serve_main(args: argparse.Namespace) -> int:
    from addons.master import parse_listen

    configure_logging()
    try:
        policy = load_effective(args.policy, managed_policy_path(args))
    except PolicyError as exc:
        return fail(*exc.lines())
    try:
        listen = parse_listen(args.listen)
        limits_from(args)  # validated before anything starts
    except ValueError as exc:
        return fail(str(exc))
    try:
        chosen = Path(args.state_dir) if args.state_dir else statedir.default_state_dir()
        state_dir = statedir.prepare_state_dir(chosen)
    except statedir.StateDirError as exc:
        return fail(f"{exc} (--state-dir / ${statedir.ENV_VAR} must be writable)")
    inspection = Inspection.from_args(args)
    try:
        inspection.check()
        ca = ensure_ca(statedir.mitmproxy_confdir(state_dir), args.ca_cert, args.ca_key)
        args.upstream_trust = upstream_trust(ca.confdir, args.upstream_ca)
    except CaError as exc:
        return fail(f"inspection CA: {exc}")
    if policy.reads_requests:
        log.warning(
            "the policy inspects requests: clients must trust the gate's CA %s "
            "(`egress ca export`)",
            ca.cert,
        )
    workers = getattr(args, "workers", 1)
    if workers < 1:
        return fail(f"--workers {workers}: expected 1 or more")
    if getattr(args, "drain_timeout", 0.0) < 0:
        return fail(f"--drain-timeout {args.drain_timeout:g}: must not be negative")
    asks = any(r.action == "ask" for r in policy.rules)
    if workers > 1 and asks and not str(args.state).startswith(("redis://", "rediss://")):
        return fail(
            f"--workers {workers} with ask rules needs approvals every worker shares: "
            "--state redis://HOST:PORT/DB (a SQLite file belongs to one gate process)"
        )
    try:
        if workers > 1:
            return _serve_workers(args, policy, listen, state_dir, workers)
        return _run(_serve(args, policy, listen, state_dir))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        return fail(str(exc))


def _run(main: Coroutine[Any, Any, int]) -> int:
    from proxy.runtime.loop import run

    return run(main)


def _serve_workers(
    args: argparse.Namespace,
    policy: Policy,
    listen: tuple[str, int],
    state_dir: Path,
    workers: int,
) -> int:
    """Fork ``workers`` gates sharing the listening address (see :mod:`proxy.app.workers`)."""
    import addons.master  # noqa: F401 - imported once here, shared by every fork

    # the approvals model before the fork: its query-digest key is then the same in every worker
    import proxy.approvals.model
    import proxy.evidence.wiring  # noqa: F401
    from proxy.app.workers import (
        Supervisor,
        per_worker_cap,
        reuseport_sockets,
        worker_file,
        worker_metrics,
    )

    sockets = reuseport_sockets(listen[0], listen[1], workers)
    address = sockets[0].getsockname()
    in_force = [
        policy
    ]  # the last version every worker was told to load: a restarted one starts there

    def body(index: int, sock: socket.socket, ready_fd: int) -> int:
        mine = copy.copy(args)
        mine.journal = worker_file(args.journal, index)
        mine.metrics = worker_metrics(args.metrics, index)
        mine.max_connections_per_client = per_worker_cap(args.max_connections_per_client, workers)
        if index:  # one DNS, hand-off and admin listener per gate: the first worker's
            mine.dns_listen = None
            mine.handoff_socket = None
            mine.admin = None
        return _run(
            _serve(mine, in_force[0], listen, state_dir, listen_socket=sock, ready_fd=ready_fd)
        )

    def check_reload() -> bool:
        try:
            new = load_effective(args.policy, managed_policy_path(args))
        except PolicyError as exc:
            for line in exc.lines():
                log.error("policy reload rejected: %s", line)
            log.error("policy reload failed; every worker keeps the policy in force")
            return False
        log.warning("policy version %s: reloading %d workers", new.version, workers)
        in_force[0] = new
        return True

    def ready() -> None:
        log.warning(
            "agent-egress gate ready listen=%s:%s workers=%d policy=%s version=%s",
            address[0],
            address[1],
            workers,
            policy_file(args.policy),
            policy.version,
        )

    return Supervisor(sockets, body, check_reload, drain=getattr(args, "drain_timeout", 0.0)).run(
        ready
    )


async def _serve_dns(dns_gate: DnsGate, host: str, port: int) -> tuple[str, int]:
    """UDP and TCP on one port. With port 0 the UDP port's TCP twin may be taken: try a few."""
    for attempt in range(20):
        tcp = await dns_gate.serve_tcp(host=host, port=port)
        try:
            await dns_gate.serve_udp(host=host, port=tcp[1])
        except OSError:
            if port != 0 or attempt == 19:
                raise
            dns_gate.close_tcp_servers()
            continue
        return tcp
    raise OSError("no free port for the DNS listener")


def load_sandboxes(
    path: str | None, managed: str | None = None
) -> tuple[Identities | None, dict[str, PolicyHolder]]:
    """Identities for a shared gate and a policy holder for each sandbox that names its own policy
    (under the managed ceiling too, when there is one); IdentityError or PolicyError when any of
    them does not load."""
    if path is None:
        return None, {}
    identities = Identities.load(Path(path))
    holders: dict[str, PolicyHolder] = {}
    for sandbox in identities.by_id.values():
        if sandbox.policy is not None:
            own = load_effective(sandbox.policy, managed)
            holders[sandbox.id] = PolicyHolder(
                sandbox.policy, own, load=functools.partial(load_with_ceiling, managed_path=managed)
            )
    return identities, holders


async def _warmed_unless_stopped(
    stop: asyncio.Event, *warm_ups: Callable[[], Awaitable[None]]
) -> bool:
    """Whether the background imports have ended (imported or failed; each warm-up waits only for
    one begun) before a stop was asked for; the imports themselves go on either way."""

    warming = asyncio.ensure_future(all_settled(*warm_ups))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((warming, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        warming.cancel()
        stopping.cancel()
    return not stop.is_set()


async def _serve(
    args: argparse.Namespace,
    policy: Policy,
    listen: tuple[str, int],
    state_dir: Path,
    *,
    listen_socket: socket.socket | None = None,
    ready_fd: int | None = None,
) -> int:
    """One gate. As a worker (``listen_socket`` set) it accepts on that shared socket, and says it is
    ready by writing one byte to ``ready_fd`` instead of logging the ready line."""
    from addons.master import Gate, GateConfig, parse_listen
    from proxy.app.approvals_cli import approvals_config
    from proxy.approvals.service import Approvals, ApprovalsError
    from proxy.destinations.resolver import Resolver
    from proxy.evidence.wiring import EvidenceConfig, EvidenceError, build_emitter
    from proxy.sandbox.handoff import HandoffServer, gate_attacher, identities_authenticator

    path = policy_file(args.policy)
    try:
        approvals = Approvals(approvals_config(args, state_dir))
    except ApprovalsError as exc:
        return fail(str(exc))
    try:
        evidence = build_emitter(
            EvidenceConfig.from_args(args),
            [decision_log_sink(args.decision_log), *approvals.sinks()],
        )
    except EvidenceError as exc:
        return fail(str(exc))
    metrics = evidence.metrics
    assert metrics is not None  # built whenever the gate is not a private one, on demand
    approvals.broker.metrics = metrics

    def on_reload(result: str, current: Policy) -> None:
        if result == "success":
            metrics.policy_loaded(current.version, [r.name for r in current.rules], current.mode)
        else:
            metrics.policy_reload_failed()

    managed = managed_policy_path(args)
    holder = PolicyHolder(
        path,
        policy,
        on_reload=on_reload,
        load=functools.partial(load_with_ceiling, managed_path=managed),
    )
    metrics.policy_loaded(policy.version, [r.name for r in policy.rules], policy.mode)
    try:
        identities, sandbox_policies = load_sandboxes(args.sandboxes, managed)
    except (IdentityError, PolicyError) as exc:
        evidence.close()
        return fail(*exc.lines()) if isinstance(exc, PolicyError) else fail(str(exc))
    for sandbox_id, own in sandbox_policies.items():
        metrics.sandbox_policy_loaded(sandbox_id, [r.name for r in own().rules])
    live = live_reload(args, holder, sandbox_policies, evidence)
    credentials = None
    if getattr(args, "credentials", None):
        from proxy.app.credentials import serve_store

        try:
            ids = list(identities.by_id) if identities else []
            credentials = serve_store(args.credentials, policy, state_dir, ids)
        except ValueError as exc:
            evidence.close()
            return fail(*str(exc).splitlines())
        metrics.credentials_loaded(credentials.names)
        if approvals.reviewer is not None:  # the reviewer's environment holds no real value
            approvals.reviewer.withheld = credentials.secret_forms

    resolver = Resolver(nameservers=args.nameserver, hosts_file=args.hosts_file or None)
    limits = limits_from(args)
    gate = Gate(
        GateConfig(
            listen_host=listen[0],
            listen_port=listen[1],
            limits=limits,
            confdir=str(statedir.mitmproxy_confdir(state_dir)),
            upstream_ca=args.upstream_trust,
            query_values=args.record_query_values,
            fast_plain_http=not getattr(args, "plain_http_via_mitmproxy", False),
        ),
        holder,
        evidence.emitter,
        resolver,
        observer=evidence,
        identities=identities,
        sandbox_policies=dict(sandbox_policies),
        approvals=approvals.broker,
        credentials=credentials,
    )
    if getattr(args, "recheck_on_reload", False):
        live.installed = tunnel_recheck(gate)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload_all() -> None:
        if credentials is not None:  # a command source runs again, a file is read again
            credentials.refresh()
        task = loop.create_task(live.reload("signal"))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_all)
    watching: asyncio.Task[None] | None = None
    dns_gate: DnsGate | None = None
    handoff: HandoffServer | None = None
    approvals_started = False
    try:
        evidence.start()
        try:
            await approvals.start(holder)
        except ApprovalsError as exc:
            return fail(str(exc))
        approvals_started = True
        if approvals.admin_address is not None:
            gate.protect_endpoint(*approvals.admin_address)
        await gate.start(listen_socket)
        resolver.warm()  # dnspython, in the background: a service's first lookup need not wait
        if args.dns_listen or args.handoff_socket:
            DnsGate.warm()
        if getattr(args, "watch_interval", 0.5) > 0:
            watching = loop.create_task(live.run(stop))
        if args.dns_listen:
            # One gate for every sandbox that can reach it: each client address gets a share of
            # the in-flight caps, so one cannot hold them all (threat 13).
            dns_gate = DnsGate(
                holder,
                resolver,
                evidence.emitter,
                max_inflight_per_client=SHARED_INFLIGHT_PER_CLIENT,
                max_tcp_per_client=SHARED_TCP_PER_CLIENT,
                # A question names no sandbox: each one's own policy must allow the name too.
                also=lambda: [own() for own in sandbox_policies.values()],
                queries_per_second=limits.dns_queries_per_second,
                queries_burst=limits.dns_queries_burst,
            )
            bound = await _serve_dns(dns_gate, *parse_listen(args.dns_listen))
        if args.handoff_socket:

            def dns_for(sandbox_id: str) -> DnsGate:
                policy_of = sandbox_policies.get(sandbox_id, holder)
                return DnsGate(
                    policy_of,
                    resolver,
                    evidence.emitter,
                    sandbox_id=sandbox_id,
                    queries_per_second=limits.dns_queries_per_second,
                    queries_burst=limits.dns_queries_burst,
                )

            handoff = HandoffServer(
                args.handoff_socket,
                approvals.ending_sessions(gate_attacher(gate, dns_for)),
                authenticate=identities_authenticator(identities) if identities else None,
            )
            await handoff.start()
        if evidence.metrics_address is not None:
            gate.protect_endpoint(*evidence.metrics_address)
        if dns_gate is not None:
            gate.protect_endpoint(bound[0], bound[1])
        host, port = gate.listen_address
        info: dict[str, Any] = {
            "listen": f"{host}:{port}",
            "policy": str(path),
            "version": policy.version,
            "rules": len(policy.rules),
            "mode": str(policy.mode),
            "sandboxes": len(identities.by_id) if identities else "any",
            "state": str(state_dir),
        }
        if managed:
            info["managed"] = managed
        if dns_gate is not None:
            info["dns"] = f"{bound[0]}:{bound[1]}"
        info.update(approvals.describe())
        for warning in approvals.warnings([policy, *(p() for p in sandbox_policies.values())]):
            log.warning("%s", warning)
        for rule in unattributable_rules([policy, *(p() for p in sandbox_policies.values())]):
            log.warning(
                "%s:%d: rule '%s' is bound to executables, which only `egress run` can see: this "
                "gate refuses every connection it matches (process-unattributed)",
                rule.file, rule.line, rule.name,
            )  # fmt: skip
        ready = " ".join(f"{k}={v}" for k, v in info.items())
        # dnspython's import, begun in the background above, is start-up too: it has ended before
        # the start's objects leave the collector's generations, however slow the machine (else
        # its modules stay in them, walked by every full collection). Bounded by the import's own
        # timeout; a failed import fails lookups closed, as before; a stop asked for meanwhile
        # stops the gate at once, never ready.
        if await _warmed_unless_stopped(stop, resolver.warmed, DnsGate.warmed):
            gate_started()
            if ready_fd is None:
                log.warning("agent-egress gate ready %s", ready)
            else:
                log.info("worker %d ready %s", os.getpid(), ready)
                with contextlib.suppress(OSError):  # a restarted worker has nobody waiting
                    os.write(ready_fd, b"R")
        await stop.wait()
        log.warning("shutting down")
    finally:
        stop.set()
        if watching is not None:
            await watching
        if handoff is not None:
            await handoff.close()
        if dns_gate is not None:
            dns_gate.close()
            await dns_gate.wait_closed()
        await gate.stop(drain=getattr(args, "drain_timeout", 0.0) if stop.is_set() else 0.0)
        if approvals_started:
            await approvals.close()
        evidence.close()
    return 0


def live_reload(
    args: argparse.Namespace,
    holder: PolicyHolder,
    sandbox_policies: dict[str, PolicyHolder],
    evidence: Any,
) -> Any:
    """The gate's live reload: every policy holder, the overlay and hosts file watched, outcomes
    reported as events, metrics and ``/healthz`` (see :mod:`proxy.app.live_reload`)."""
    from proxy.app.live_reload import LiveReload

    extra: list[Path] = []
    if getattr(args, "approved_file", None):
        extra.append(Path(args.approved_file))
    if getattr(args, "hosts_file", None):
        extra.append(Path(args.hosts_file))
    holders: dict[str | None, PolicyHolder] = {None: holder}
    holders.update(sandbox_policies)

    def sandbox_outcome(sandbox_id: str, own: PolicyHolder) -> None:
        if own.stale:
            evidence.metrics.policy_reload_failed()
        else:
            evidence.metrics.sandbox_policy_loaded(sandbox_id, [r.name for r in own().rules])

    live = LiveReload(
        holders,
        event=evidence.emitter.event,
        extra_paths=lambda: extra,
        interval=getattr(args, "watch_interval", 0.5) or 0.5,
        sandbox_outcome=sandbox_outcome,
    )
    evidence.metrics.health = live.health
    return live


def tunnel_recheck(gate: Any) -> Any:
    """``--recheck-on-reload``: after each reload, close the tunnels the new policy refuses."""
    from proxy.core.recheck import recheck

    async def after(_sandbox: str | None, _policy: Policy) -> None:
        checkpoint = gate.checkpoint
        closed = recheck(checkpoint.connections, checkpoint.policy_for, checkpoint.emitter.emit)
        if closed:
            log.warning("policy reload closed %d tunnel(s) it no longer allows", len(closed))

    return after


def unattributable_rules(policies: list[Any]) -> list[Any]:
    """Rules bound to executables in policies served where no process can be named."""
    return [rule for policy in policies for rule in policy.rules if rule.executables]
