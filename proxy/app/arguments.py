"""Options more than one ``egress`` command takes, declared once. Only argparse (and the argparse-only
evidence flags) is imported here, so ``egress --help`` stays fast."""

from __future__ import annotations

import argparse


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
    add_evidence_arguments(parser)
