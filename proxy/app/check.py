"""``egress check``: the gate's answer for one destination, without running a gate.

A dry run is only useful if it tells the truth, so it goes through the same checkpoint as the gate:
identity aside, every step the gate takes without the network is taken here too - host canonicalisation,
the policy, internal-address screening of IP literals in every spelling, the gate's own listeners (with
``--listen``), report mode never relaxing a safety refusal. Whether a *name* is safe depends on what it
resolves to; without ``--resolve`` the output says so, and with it the name is resolved like the gate
resolves it (``--nameserver``) and its addresses are screened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any
from urllib.parse import urlsplit

from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.destination import DestinationCheck
from proxy.core.hosts import InvalidHost, canonical_host, parse_endpoint, split_authority
from proxy.core.text import escape
from proxy.evidence.emit import Emitter
from proxy.policy.model import Policy

EXIT_OK, EXIT_DENY, EXIT_ERROR = 0, 1, 2


def parse_target(target: str, method: str | None) -> tuple[str, str, int, str | None, str | None]:
    """(kind, host, port, method, path) the way the gate reads them; raises ValueError naming the
    problem. A URL never carries a bare IPv6 address (``http://2001::1/``); ``HOST[:PORT]`` may."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in target):
        raise ValueError("whitespace or control characters in the target")
    if "://" in target:
        parts = urlsplit(target)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {escape(parts.scheme)!r} (use http or https)")
        if "\\" in parts.netloc:
            raise ValueError("a backslash in the URL's authority")
        default_port = 443 if scheme == "https" else 80
        host, port = split_authority(parts.netloc, default_port, bare_ipv6=False)
        path = parts.path or "/"
        if scheme == "https":
            return "connect", host, port, "CONNECT", None
        return "http", host, port, (method or "GET").upper(), path
    host, port = split_authority(target, 443)
    return "connect", host, port, "CONNECT", None


async def check(
    policy: Policy,
    request: Request,
    *,
    resolve: bool = False,
    nameservers: list[str] | None = None,
    hosts_file: str | None = "/etc/hosts",
    listeners: list[tuple[str, int]] | None = None,
) -> Decision:
    """The decision the gate would make for ``request``; resolves only with ``resolve``."""
    names: Any = None
    if resolve:
        from proxy.destinations.resolver import Resolver

        names = Resolver(nameservers=nameservers, hosts_file=hosts_file)
    own = None
    if listeners:
        from proxy.destinations.local import OwnEndpoints

        own = OwnEndpoints(listeners)
    would_ask = _WouldAsk()
    checkpoint = Checkpoint(
        lambda: policy, Emitter(), DestinationCheck(names), own=own, approvals=would_ask
    )
    decision = await checkpoint.admit(Connection(peer=None, sandbox_id=None), request)
    return would_ask.asked or decision


class _WouldAsk:
    """The approver of a dry run: notes that the gate would hold the request for an approval (after
    every check before it passed), and answers nothing."""

    def __init__(self) -> None:
        self.asked: Decision | None = None

    async def answer(self, decision: Decision, rule: Any, record: Any) -> Decision:
        self.asked = decision
        return decision.with_(decision=Verdict.DENY, reason=Reason.APPROVAL_UNAVAILABLE)


def run(args: argparse.Namespace, policy: Policy) -> int:
    try:
        kind, host, port, method, path = parse_target(args.target, args.method)
        listeners = [parse_endpoint(spec) for spec in args.listen]
    except ValueError as exc:  # InvalidHost is a ValueError
        print(f"error: {escape(args.target)!r}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    request = Request(kind=Kind(kind), host=host, port=port, method=method, path=path)
    decision = asyncio.run(
        check(
            policy,
            request,
            resolve=args.resolve,
            nameservers=args.nameserver,
            hosts_file=args.hosts_file or None,
            listeners=listeners,
        )
    )
    unresolved = decision.allowed and decision.address is None and _is_name(decision.host)
    if args.json:
        out = decision.to_dict()
        out["depends_on_dns"] = unresolved
        print(json.dumps(out, ensure_ascii=True))
    else:
        where = f"{decision.host}:{decision.port}"
        print(
            f"{decision.decision.upper()} {where} rule={decision.rule or '-'} reason={decision.reason}"
        )
        if decision.detail:
            print(f"  {decision.detail}")
        if decision.address is not None and decision.allowed:
            print(f"  address: {decision.address}")
        if unresolved:
            print(
                f"  depends on DNS: the gate resolves {decision.host} and refuses it if every "
                "address is internal; run with --resolve to check that too"
            )
    return EXIT_OK if decision.allowed else EXIT_DENY


def _is_name(host: str) -> bool:
    try:
        return isinstance(canonical_host(host), str)
    except InvalidHost:
        return False


__all__ = ["check", "parse_target", "run"]
