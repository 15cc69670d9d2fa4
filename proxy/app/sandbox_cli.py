"""The ``run``, ``doctor`` and ``connect`` subcommands of ``egress``: the sandbox's side of the CLI.

Nothing heavy is imported here, not even argparse: ``egress run`` reads an everyday command line
without it (:mod:`proxy.app.run_args`), and everything else is imported by the command that runs.
"""

from __future__ import annotations

import contextlib
import os
import sys

from proxy.app.run_args import context_pair, host_port, port_number, read_run, sandbox_id

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from proxy.sandbox.private_gate import GateRequest, PrivateGate
    from proxy.sandbox.trust import Trust, TrustSetup


def run_parser(prog: str = "egress") -> argparse.ArgumentParser:
    """``egress`` with its ``run`` command only: what ``egress run`` parses its arguments with, so
    that starting a sandbox builds (and imports) nothing the other commands need."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    add_run(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def add_run(subparsers: Any) -> None:
    """Add ``run`` to ``egress``'s subparsers. A new option also goes into
    :data:`proxy.app.run_args.OPTIONS` (tests/proxy/app/test_run_args.py says so)."""
    import argparse

    from proxy.app.arguments import add_gate_options, add_policy_option
    from proxy.app.credentials import add_credentials_option
    from proxy.app.lifecycle_args import add_lifecycle_options
    from proxy.sandbox import DEFAULT_DNS_PORT, DEFAULT_PROXY_PORT

    run = subparsers.add_parser(
        "run",
        help="run a command whose only network route is the gate",
        description=(
            "Run CMD in its own network namespace holding only loopback. The gate's proxy "
            f"(127.0.0.1:{DEFAULT_PROXY_PORT}) and DNS gate (127.0.0.1:{DEFAULT_DNS_PORT}) are the "
            "only things it can reach; proxy variables for common tools are set. Exits with CMD's "
            "status (128+N if killed by signal N, 125 if the sandbox could not be set up)."
        ),
    )
    add_policy_option(run)
    add_lifecycle_options(run, watch=False)
    run.add_argument(
        "--proxy",
        metavar="URL",
        default=None,
        help="join a running gate (http://[ID:TOKEN@]HOST:PORT) instead of starting a private one",
    )
    run.add_argument(
        "--dns",
        metavar="HOST:PORT",
        type=host_port,
        default=None,
        help="with --proxy: the running gate's DNS gate (default: no DNS inside the sandbox)",
    )
    run.add_argument(
        "--gate-socket",
        metavar="PATH",
        default=None,
        help="hand the sandbox to a gate on this machine through its Unix socket (no relay; "
        "a credential, if the gate needs one, is read from $EGRESS_SANDBOX_TOKEN)",
    )
    run.add_argument(
        "--reuse-gate",
        action="store_true",
        help="hand the sandbox to this user's shared gate (started on first use, exits when idle) "
        "instead of starting a gate for this run; the run keeps its own policy. Runs the shared "
        "gate cannot serve as their own gate would (other options, ask rules, rules bound to "
        "executables) start their own. Also $EGRESS_REUSE_GATE=1",
    )
    run.add_argument(
        "--sandbox-id", type=sandbox_id, default=None, help="id carried on every decision"
    )
    add_credentials_option(run)
    run.add_argument("--quiet", action="store_true", help="no summary at exit")
    run.add_argument(
        "--summary",
        choices=("text", "json"),
        default="text",
        help="the summary at exit (stderr): text, or one JSON object with allowed and refused "
        "counts and reasons per process and per destination",
    )
    run.add_argument(
        "--context",
        action="append",
        default=[],
        type=context_pair,
        metavar="KEY=VALUE",
        help="agent context every decision carries (task=T, session=S, ...); repeatable; change "
        "it while the sandbox runs with `egress context SANDBOX KEY=VALUE`",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="announce pending approvals (ask rules) as JSON lines on stderr, with the commands "
        "that answer them",
    )
    run.add_argument(
        "--no-isolation",
        action="store_true",
        help="DANGEROUS: no network namespace; the command can bypass the gate (debugging only)",
    )
    run.add_argument(
        "--proxy-port",
        type=port_number,
        default=DEFAULT_PROXY_PORT,
        help=f"the proxy port inside the sandbox (default {DEFAULT_PROXY_PORT})",
    )
    add_gate_options(
        run,
        decision_log="append one JSON line per decision to FILE ('-' for stderr; default: summary "
        "only)",
    )
    # A private gate per run: several runs at once must not fight over one metrics port, so
    # metrics are served only when asked for with --metrics.
    run.set_defaults(metrics=None)
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    run.set_defaults(func=_cmd_run)


def register(subparsers: Any) -> None:
    """Add ``run``, ``doctor`` and ``connect`` to ``egress``'s subparsers (``add_subparsers()``)."""
    add_run(subparsers)
    doctor = subparsers.add_parser(
        "doctor",
        help="prove that the sandbox's only route is the gate (enforcement self-test)",
        description=(
            "Start a sandbox and check from inside that direct TCP, UDP and IPv6, outside resolvers "
            "and the host's loopback services are unreachable, and that the gate path works. Sends "
            "nothing off this machine. Exits 1 on any gap."
        ),
    )
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    doctor.set_defaults(func=_cmd_doctor)

    connect = subparsers.add_parser(
        "connect",
        help="stdio-to-CONNECT helper (ssh ProxyCommand, git://)",
        description="Open a CONNECT tunnel through the gate and relay stdin/stdout over it.",
    )
    from proxy.sandbox.connect import add_arguments

    add_arguments(connect)
    connect.set_defaults(func=_cmd_connect)


def run_command(words: list[str], *, leave: bool = False) -> int:
    """``egress run``: parse, run, and with ``leave`` (the process's own entry point) end a run that
    joined a gate without the interpreter's teardown (see :func:`_leave`)."""
    values = read_run(words)
    if values is not None:  # an everyday command line: argparse would read it the same way
        from types import SimpleNamespace

        args: argparse.Namespace = SimpleNamespace(**values, func=_cmd_run)  # type: ignore[assignment]
    else:
        args = run_parser().parse_args(words)
    code: int = args.func(args)
    if leave and (_joins(args) or not _evidence_wanted(args)):
        _leave(code)
    return code


def _joins(args: argparse.Namespace) -> bool:
    """The sandbox joins a gate elsewhere (--gate-socket, --proxy): this process runs no gate."""
    return args.gate_socket is not None or args.proxy is not None


def _leave(code: int) -> None:
    """Exit now: freeing every module and object at interpreter exit costs ~10 ms after a hand-off
    (as much as the hand-off itself) and ~100 ms after a private gate. Only when nothing is left to
    flush: the launcher has closed what it opened (the sandbox's sockets, its connection to the gate,
    the private gate with its decision log), and no evidence sink (journal, OTLP, metrics) was asked
    for, whose libraries flush at exit. If a thread other than a daemon still runs, the normal exit
    (which waits for it) is kept."""
    threading = sys.modules.get("threading")
    if threading is not None and any(
        t.is_alive() and not t.daemon and t is not threading.main_thread()
        for t in threading.enumerate()
    ):
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _cmd_run(args: argparse.Namespace) -> int:
    from proxy.app.credentials import sandbox_credentials
    from proxy.app.lifecycle_args import managed_policy_path
    from proxy.sandbox.launcher import RunOptions, run

    if _joins(args) and not (args.ca_cert or args.ca_key or args.upstream_ca):
        trust: Any = _joined_trust(args.state_dir)  # no CA to trust: no CA code to load
    else:
        trust = _own_trust(args)
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    reuse = _reusable(args)  # before the paths are resolved (a resolved default is no default)
    _resolve_own_files(args)
    options = RunOptions(
        argv=cmd,
        policy_path=args.policy,  # a str: loading takes one, and pathlib stays off this path
        proxy_url=args.proxy,
        dns_target=args.dns,
        gate_socket=args.gate_socket,
        token=os.environ.get("EGRESS_SANDBOX_TOKEN") or None,
        sandbox_id=args.sandbox_id,
        quiet=args.quiet,
        isolation=not args.no_isolation,
        nameservers=args.nameserver,
        hosts_file=args.hosts_file or None,
        decision_log=args.decision_log,
        journal=args.journal,
        proxy_port=args.proxy_port,
        json=args.json,
        evidence=_evidence_builder(args),
        gate=None if _joins(args) else _private_gate_starter(args),
        gate_modules=GATE_MODULES,
        trust=trust,
        state_dir=args.state_dir,
        managed_policy=managed_policy_path(args),
        credentials=sandbox_credentials(args.credentials),
        summary_format=args.summary,
        context=dict(args.context),
        traceparent=os.environ.get("TRACEPARENT") or None,
        reuse_gate=reuse,
        also_hidden=_own_state(args, reuse),
    )
    return run(options)


def _resolve_own_files(args: argparse.Namespace) -> None:
    """The run's state directory, journal, decision log and own hosts file by their real paths,
    resolved once, before the sandbox exists. The sandbox hides or freezes each and pins the
    directories above it, but a symbolic link on the way is an entry of a directory it may write:
    it could replace the link with a directory of its own, and the gate, which opens some of these
    files after the command has started (and reads the hosts file again when it changes), would
    then read approvals and names, and write evidence, where the command chose."""
    from proxy.app.statedir import real_state_dir

    if not _joins(args):  # the run's own gate, whose state this is
        args.state_dir = real_state_dir(args.state_dir)
    for name in ("journal", "decision_log", "hosts_file"):
        path = getattr(args, name, None)
        if path and path not in ("-", "/etc/hosts"):  # /etc is the system's (and pinned)
            setattr(args, name, os.path.realpath(path))


def _own_state(args: argparse.Namespace, reuse: bool) -> tuple[str, ...]:
    """This user's own gate state (its CA key), when a gate elsewhere (the shared one) may serve
    the run (``reuse``): a private gate hides it anyway, the shared gate hides only its own."""
    from proxy.app.statedir import state_dir_to_hide

    if not reuse:
        return ()
    found = state_dir_to_hide(args.state_dir)
    return (found,) if found is not None else ()


# What a run may ask for and still be served by this user's shared gate: its policy, ceiling, id,
# context, proxy port, summary and a decision log file. Any other option has a value only a gate of
# its own can honour (a decision log on stderr too: a stalled reader must not stall a shared gate).
_REUSABLE = frozenset(
    {
        "policy",
        "managed_policy",
        "sandbox_id",
        "context",
        "quiet",
        "summary",
        "proxy_port",
        "decision_log",
    }
)


def _reusable(args: argparse.Namespace) -> bool:
    """--reuse-gate (or $EGRESS_REUSE_GATE) for a run with nothing the shared gate cannot serve."""
    if not (getattr(args, "reuse_gate", False) or os.environ.get("EGRESS_REUSE_GATE")):
        return False  # the usual case, decided without importing the per-user gate's module
    from proxy.app.run_args import DEFAULTS
    from proxy.sandbox.usergate import wanted

    if not wanted(bool(getattr(args, "reuse_gate", False))):
        return False
    if _evidence_wanted(args) or args.decision_log == "-":
        return False
    return all(
        getattr(args, dest, default) == default
        for dest, default in DEFAULTS.items()
        if dest not in _REUSABLE and dest != "reuse_gate"
    )


def _joined_trust(state_dir: str | None) -> TrustSetup:
    """A sandbox joining a gate elsewhere with no CA named: it trusts nothing new, and this user's own
    gate state (its CA key) stays hidden from it (made first where there is none yet)."""

    def setup(_policy: object) -> Trust:
        from proxy.app.statedir import state_dir_to_hide
        from proxy.sandbox.trust import Trust

        found = state_dir_to_hide(state_dir)
        return Trust(bundle=None, hidden=(str(found),) if found is not None else ())

    return setup


def _own_trust(args: argparse.Namespace) -> TrustSetup:
    """The trust set-up of a run with its own gate, its CA code imported only when it is set up: a
    run that a per-user gate serves never loads it."""

    def setup(policy: Any) -> Trust | None:
        from proxy.app.ca import Inspection
        from proxy.app.private_gate import sandbox_trust

        return sandbox_trust(Inspection.from_args(args))(policy)

    return setup


GATE_MODULES = (
    "proxy.core.connections",
    "proxy.core.credentials",
    "proxy.core.engine",
    "proxy.core.checkpoint",
    "addons.clientsend",
    "addons.plainhttp",
    "addons.master",
    "proxy.attribution.channel",
    "proxy.destinations.resolver",
    "proxy.attribution.procfs",
    "proxy.destinations.dnsgate",
)
"""What the private gate's start imports, in import order, in steps of a few milliseconds: the
launcher loads them one at a time while the sandbox comes up and its command starts, and starts no
gate at all for a command that ended first with nothing for it (tests/proxy/app/test_sandbox_cli.py
holds this list to what a start imports)."""


def _private_gate_starter(args: argparse.Namespace) -> Any:
    async def start(request: GateRequest) -> PrivateGate:
        """Imported only when a private gate starts: the joined modes never load the gate."""
        from proxy.app.ca import Inspection
        from proxy.app.private_gate import start_private_gate

        return await start_private_gate(request, Inspection.from_args(args))

    return start


def _evidence_wanted(args: argparse.Namespace) -> bool:
    """A journal, metrics or an OTLP endpoint is asked for (flags or the OTel environment)."""
    return bool(
        args.journal
        or args.audit_required
        or (args.metrics and not args.no_metrics)
        or args.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def _evidence_builder(args: argparse.Namespace) -> Any:
    """Deferred: only a private gate needs the sinks, and importing them (OpenTelemetry,
    prometheus-client) costs ~100 ms that `egress run --proxy ... -- CMD` should not pay. None when
    no sink is asked for (no journal, metrics or OTLP endpoint): the run's summary and decision log
    need none of them, so a plain run does not import them at all."""
    if not _evidence_wanted(args):
        return None

    def build(sinks: list[Any]) -> Any:
        from proxy.evidence.wiring import EvidenceConfig, build_emitter

        return build_emitter(EvidenceConfig.from_args(args), sinks, on_demand=True)

    return build


def _cmd_doctor(args: argparse.Namespace) -> int:
    from proxy.app.private_gate import start_private_gate
    from proxy.sandbox.doctor import doctor_main

    return doctor_main(start_private_gate, json_output=args.json)


def _cmd_connect(args: argparse.Namespace) -> int:
    from proxy.sandbox.connect import connect_main

    return connect_main(args)
