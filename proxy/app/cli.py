"""The ``egress`` command line.

Heavy imports (mitmproxy, OpenTelemetry, dnspython) happen inside the command that needs them, so
``egress --help``, ``egress lint`` and ``egress check`` stay fast enough to run in editors and CI hooks.
Exit codes (``proxy/app/exits.py``) are part of the interface.
"""

from __future__ import annotations

import sys

from proxy import __version__
from proxy.app.exits import EXIT_DENY, EXIT_OK, fail

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

DEFAULT_LISTEN = "127.0.0.1:3128"


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: `egress run` (main's fast path) never builds this tree.
    import argparse

    from proxy.app import approvals_cli, context_cli, learn_cli
    from proxy.app import credentials as credentials_cli
    from proxy.app.arguments import (
        add_check_options,
        add_front_end_options,
        add_gate_options,
        add_limit_options,
        add_policy_option,
        add_state_dir_option,
        finite,
    )
    from proxy.app.lifecycle_args import add_lifecycle_options

    parser = argparse.ArgumentParser(
        prog="egress",
        description=(
            "agent-egress: a default-deny network gate for autonomous coding agents. "
            "Allowlisted package registries and source hosts are reachable; everything else is refused "
            "with a reason, and every decision is recorded."
        ),
    )
    parser.add_argument("--version", action="version", version=f"agent-egress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the gate as an HTTP(S) proxy",
        description="Run the gate as a standalone HTTP proxy (point clients at it with HTTPS_PROXY).",
    )
    add_policy_option(serve)
    serve.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"proxy listener (default {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--dns-listen",
        metavar="HOST:PORT",
        default=None,
        help="also answer DNS (UDP and TCP) for sandboxes: allowed names only, nothing else is "
        "ever queried upstream (default: off)",
    )
    serve.add_argument(
        "--handoff-socket",
        metavar="PATH",
        default=None,
        help="accept sandbox listeners from `egress run --gate-socket PATH` on this Unix socket "
        "(mode 0600; the gate then serves each sandbox without a relay)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="gate processes sharing the listening address (SO_REUSEPORT), one core each; a worker "
        "that dies is started again (default %(default)s)",
    )
    add_limit_options(serve)
    add_front_end_options(serve)
    serve.add_argument(
        "--drain-timeout",
        type=finite,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT stop accepting, let connections in flight finish for up to this long, "
        "then close the rest, flush the evidence and exit 0 (default %(default)s; 0 closes at once)",
    )
    serve.add_argument(
        "--sandboxes",
        metavar="FILE",
        default=None,
        help="shared gate: require a per-sandbox proxy credential listed in FILE (see `egress token`)",
    )
    add_gate_options(
        serve, decision_log="append one JSON line per decision to FILE (default: stderr)"
    )
    approvals_cli.add_serve_options(serve)
    add_lifecycle_options(serve)
    credentials_cli.add_credentials_option(serve)
    serve.set_defaults(func=_cmd_serve)
    learn_cli.add_commands(sub)
    credentials_cli.register(sub)

    token = sub.add_parser(
        "token",
        help="create a sandbox credential for a shared gate's --sandboxes file",
        description="Print a new random token for sandbox ID and the line to add to the --sandboxes file.",
    )
    token.add_argument("sandbox_id", metavar="ID")
    token.set_defaults(func=_cmd_token)

    check = sub.add_parser(
        "check",
        help="print the gate's decision for a URL or HOST[:PORT] without running a gate",
        description=(
            "Decide a destination the way the gate would, without a gate: the policy, internal "
            "addresses in every IP spelling, the gate's own listeners (--listen). A host name's "
            "addresses are checked only with --resolve (the output says when a verdict depends on "
            "DNS). Exit 0 allow (or report), 1 deny, 2 error."
        ),
    )
    add_policy_option(check)
    add_check_options(check)
    add_lifecycle_options(check, watch=False)
    check.set_defaults(func=_cmd_check)

    lint = sub.add_parser(
        "lint",
        help="validate policy files and print every problem",
        description="Validate policy files; prints every problem as FILE:LINE: rule, key, message.",
    )
    lint.add_argument("files", nargs="+", metavar="FILE")
    lint.add_argument(
        "--managed",
        metavar="FILE",
        default=None,
        help="also check each file against this managed policy (the organisation's ceiling)",
    )
    lint.set_defaults(func=_cmd_lint)

    ca = sub.add_parser(
        "ca",
        help="the inspection CA: where it is, its certificate, or create/install it",
        description=(
            "The gate terminates TLS only for hosts whose rules read requests, with certificates "
            "from its own CA. Clients must trust that CA (`egress run` sets that up itself)."
        ),
    )
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="SUBCOMMAND", required=True)
    for name, text in (
        ("path", "print the path of the CA certificate (PEM)"),
        ("export", "print the CA certificate (PEM) to stdout, for clients to trust"),
        ("init", "create the CA in the state directory, or install --ca-cert/--ca-key there"),
    ):
        command = ca_sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_state_dir_option(command)
        if name == "init":
            command.add_argument("--ca-cert", metavar="FILE", default=None, help="CA certificate")
            command.add_argument("--ca-key", metavar="FILE", default=None, help="its private key")
        command.set_defaults(func=_cmd_ca)

    audit = sub.add_parser("audit", help="audit journal tools")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="verify the hash chain of audit journal files",
        description="Detect edited, removed, reordered or truncated records; exit 1 naming where.",
    )
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.add_argument(
        "--allow-missing-start",
        action="store_true",
        help="the oldest files were archived: do not require the chain to start at its first record",
    )
    verify.set_defaults(func=_cmd_audit_verify)

    from proxy.app.sandbox_cli import register

    register(sub)
    approvals_cli.register(sub)
    context_cli.register(sub)
    return parser


def _cmd_lint(args: argparse.Namespace) -> int:
    from pathlib import Path  # here, not at the top: `egress run` does not load pathlib

    from proxy.policy.loader import lint_files

    problems = lint_files([Path(f) for f in args.files])
    if args.managed and not problems:
        from proxy.policy.managed import managed_lint

        problems = managed_lint(args.managed, [Path(f) for f in args.files])
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {len(args.files)} file(s)", file=sys.stderr)
        return EXIT_DENY
    print(f"ok: {len(args.files)} file(s)", file=sys.stderr)
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from proxy.app.check import run
    from proxy.app.lifecycle_args import managed_policy_path
    from proxy.policy.managed import load_effective
    from proxy.policy.model import PolicyError

    try:
        policy = load_effective(args.policy, managed_policy_path(args))
    except PolicyError as exc:
        return fail(*exc.lines())
    return run(args, policy)


def _cmd_ca(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.app import statedir
    from proxy.app.ca import CaError, CaFiles, ensure_ca

    try:
        chosen = Path(args.state_dir) if args.state_dir else statedir.default_state_dir()
        if args.ca_command == "init":
            state = statedir.prepare_state_dir(chosen)
            existed = CaFiles(statedir.mitmproxy_confdir(state)).exists()
            files = ensure_ca(statedir.mitmproxy_confdir(state), args.ca_cert, args.ca_key)
            verb = "installed" if args.ca_cert else ("exists" if existed else "created")
            print(files.cert)
            print(f"inspection CA {verb}: {files.cert}", file=sys.stderr)
            return EXIT_OK
        files = CaFiles(statedir.mitmproxy_confdir(chosen.absolute()))
        if not files.exists():
            return fail(f"no inspection CA in {files.confdir}; create one with `egress ca init`")
        if args.ca_command == "path":
            print(files.cert)
        else:
            sys.stdout.write(files.cert.read_text())
        return EXIT_OK
    except (CaError, statedir.StateDirError, OSError) as exc:
        return fail(str(exc))


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from proxy.evidence.journal.verify import run

    return run(args.files, require_genesis=not args.allow_missing_start)


def _cmd_token(args: argparse.Namespace) -> int:
    from proxy.core.sandbox_id import check_sandbox_id
    from proxy.policy.identities import new_token, token_digest

    try:
        check_sandbox_id(args.sandbox_id)
    except ValueError as exc:
        return fail(str(exc))
    token = new_token()
    print(f"token: {token}")
    print(f"proxy URL for the sandbox: http://{args.sandbox_id}:{token}@GATE_HOST:3128")
    print("add to the --sandboxes file:")
    print(f"  - id: {args.sandbox_id}")
    print(f"    token_sha256: {token_digest(token)}")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from proxy.app.serve import serve_main

    return serve_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    from proxy.runtime.safepath import drop_environment_path, drop_working_directory

    drop_working_directory()  # before any module a gate imports late, after its command started
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["run"]:  # the sandbox launcher: its own parser and imports only
        drop_environment_path()  # the command's PYTHONPATH is not its gate's
        from proxy.app.sandbox_cli import run_command

        try:
            return run_command(words, leave=argv is None)
        except KeyboardInterrupt:  # Ctrl-C before the command's release or after its end (between,
            # it goes to the command); the sandbox is already torn down by the way out
            sys.stderr.write("egress run: interrupted\n")
            return 130
    from proxy.runtime import codecache

    codecache.install()
    parser = build_parser()
    args = parser.parse_args(words)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
