"""Options more than one ``egress`` command takes, declared once. Only argparse (and the argparse-only
evidence flags) is imported here, so ``egress --help`` stays fast."""

from __future__ import annotations

import argparse
import math

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from typing import Any


def add_policy_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        metavar="FILE",
        default=None,
        help="policy YAML (default: the shipped allowlists/default.yaml)",
    )


def add_gate_options(parser: argparse.ArgumentParser, *, decision_log: str) -> None:
    """Options of every command that runs a gate (serve, run): where decision lines go, which DNS
    server checks destinations, and the evidence sinks (journal, OTel, metrics)."""
    from proxy.evidence.flags import add_evidence_arguments

    parser.add_argument("--decision-log", metavar="FILE", default=None, help=decision_log)
    parser.add_argument(
        "--nameserver",
        action="append",
        default=None,
        metavar="IP[:PORT]",
        help="DNS server for destination checks (repeatable; default: the system's resolv.conf)",
    )
    add_hosts_file_option(parser)
    add_inspection_options(parser)
    add_evidence_arguments(parser)


def add_state_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        default=None,
        help="writable directory for the gate's own files (its inspection CA); created if missing "
        "(default: $EGRESS_STATE_DIR, else $XDG_STATE_HOME/agent-egress, "
        "else ~/.local/state/agent-egress)",
    )


def add_inspection_options(parser: argparse.ArgumentParser) -> None:
    """Where the gate's state (its inspection CA) lives, and how inspected traffic is handled."""
    add_state_dir_option(parser)
    parser.add_argument(
        "--ca-cert",
        metavar="FILE",
        default=None,
        help="inspection CA certificate (PEM) to issue from instead of the one in the state "
        "directory; with --ca-key (e.g. a Kubernetes Secret shared by replicas)",
    )
    parser.add_argument(
        "--ca-key", metavar="FILE", default=None, help="the private key of --ca-cert (PEM)"
    )
    parser.add_argument(
        "--upstream-ca",
        metavar="FILE",
        default=None,
        help="extra CA certificates (PEM) trusted for upstreams of inspected hosts, besides the "
        "system's; upstream certificates are always verified",
    )
    parser.add_argument(
        "--record-query-values",
        action="store_true",
        help="record query parameter values in decisions (default: names only; URLs carry tokens)",
    )


def add_hosts_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hosts-file",
        metavar="FILE",
        default="/etc/hosts",
        help="names in this file are resolved from it before DNS, re-read when it changes "
        "(default %(default)s; '' for none)",
    )


def add_check_options(check: argparse.ArgumentParser) -> None:
    """``egress check``: what to decide, and how much of the gate's context to apply."""
    check.add_argument(
        "--method",
        default=None,
        help="HTTP method of the request (default GET); decided against request rules for http:// "
        "URLs and for https:// URLs whose host the policy inspects",
    )
    check.add_argument(
        "--data",
        metavar="TEXT|@FILE",
        default=None,
        help="the request body, for rules that read it (GraphQL documents, LFS batch requests)",
    )
    check.add_argument(
        "--content-type",
        metavar="TYPE",
        default=None,
        help="the request's Content-Type (default: none, as the gate sees a request without one); "
        "rules that read a JSON body match only application/json or application/*+json",
    )
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.add_argument(
        "--resolve",
        action="store_true",
        help="resolve a host name like the gate does and screen its addresses (uses the network: "
        "DNS only)",
    )
    check.add_argument(
        "--nameserver",
        action="append",
        default=None,
        metavar="IP[:PORT]",
        help="DNS server for --resolve (repeatable; default: the system's resolv.conf)",
    )
    add_hosts_file_option(check)
    check.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a listener of the gate being dry-run (repeatable): destinations reaching it are refused",
    )
    check.add_argument("target", help="https://host/path, http://host:port/path or HOST[:PORT]")


def finite(text: str) -> float:
    """An option's number of seconds or rate: ``nan`` and ``inf`` are refused where the option is
    read (NaN compares false with every bound, so a limit of NaN would be no limit at all)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """The gate's resource limits (``proxy.core.limits.Limits``); defaults are the documented ones."""
    from proxy.core.limits import Limits

    defaults = Limits()
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help="concurrent connections the whole gate holds; also fitted to the open-file limit "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-connections-per-client",
        type=int,
        default=defaults.max_connections_per_client,
        metavar="N",
        help="concurrent connections one client (sandbox or address) may hold (default %(default)s)",
    )
    parser.add_argument(
        "--max-new-connections-per-second",
        type=finite,
        default=defaults.new_connections_per_second,
        metavar="RATE",
        help="new connections per second one client may open, sustained (default %(default)s; "
        "0 disables)",
    )
    parser.add_argument(
        "--new-connections-burst",
        type=int,
        default=defaults.new_connections_burst,
        metavar="N",
        help="new connections one client may open at once above that rate (default %(default)s)",
    )
    parser.add_argument(
        "--max-dns-queries-per-second",
        type=finite,
        default=defaults.dns_queries_per_second,
        metavar="RATE",
        help="DNS questions per second one client address may ask the DNS gate, sustained; "
        "those over it are dropped unanswered (default %(default)s; 0 disables)",
    )
    parser.add_argument(
        "--dns-queries-burst",
        type=int,
        default=defaults.dns_queries_burst,
        metavar="N",
        help="DNS questions one client address may ask at once above that rate "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--request-timeout",
        type=finite,
        default=defaults.request_timeout,
        metavar="SECONDS",
        help="every request head, and a tunnel's first bytes, must arrive within this time or the "
        "connection is closed (default %(default)s; 0 disables)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=finite,
        default=defaults.idle_timeout,
        metavar="SECONDS",
        help="a relayed tunnel that moves no byte either way for this long, or a kept-alive "
        "plain-HTTP connection with no request for this long, is closed and recorded "
        "(default %(default)s; 0 disables it for tunnels)",
    )


def add_front_end_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plain-http-via-mitmproxy",
        action="store_true",
        help="serve every plain-HTTP request through mitmproxy's layers, not the front end's own "
        "keep-alive path (same decisions, slower; see docs/plain-http.md)",
    )


def limits_from(args: argparse.Namespace) -> Any:
    """The ``Limits`` the options above describe; ValueError names a bad one."""
    from proxy.core.limits import Limits

    for flag, value in (
        ("--max-connections", args.max_connections),
        ("--max-connections-per-client", args.max_connections_per_client),
        ("--new-connections-burst", args.new_connections_burst),
        ("--dns-queries-burst", args.dns_queries_burst),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, not {value}")
    for flag, number in (
        ("--max-new-connections-per-second", args.max_new_connections_per_second),
        ("--max-dns-queries-per-second", args.max_dns_queries_per_second),
        ("--request-timeout", args.request_timeout),
        ("--idle-timeout", args.idle_timeout),
    ):
        # NaN compares false with everything: read as a limit, it would be no limit at all
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{flag} must be a finite number, not negative, not {number:g}")
    return Limits(
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        new_connections_per_second=args.max_new_connections_per_second,
        new_connections_burst=args.new_connections_burst,
        request_timeout=args.request_timeout,
        idle_timeout=args.idle_timeout,
        dns_queries_per_second=args.max_dns_queries_per_second,
        dns_queries_burst=args.dns_queries_burst,
    )
