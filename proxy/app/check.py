"""``egress check``: the gate's answer for one destination, without running a gate.

A dry run is only useful if it tells the truth, so it goes through the same checkpoint as the gate:
identity aside, every step the gate takes without the network is taken here too - host canonicalisation,
the policy, internal-address screening of IP literals in every spelling, the gate's own listeners (with
``--listen``), report mode never relaxing a safety refusal. Whether a *name* is safe depends on what it
resolves to; without ``--resolve`` the output says so, and with it the name is resolved like the gate
resolves it (``--nameserver``) and its addresses are screened. It sees no process either: a rule bound
to executables (or a report the managed policy allows only for some) is refused, as a gate that cannot
see processes refuses it, and the output says that ``egress run`` decides by the process.

Request rules are decided too, the way the gate decides them: an ``https://`` URL to a host whose rules
read requests is a CONNECT, its ClientHello, then the request (``--method``, the URL's path and query,
and ``--data`` with ``--content-type`` for rules that read the body) inside the inspected tunnel; an ``http://`` URL is one
plain request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.core.bodies import is_json
from proxy.core.checkpoint import Checkpoint
from proxy.core.connections import Connection
from proxy.core.decision import Decision, Kind, Reason, Request, Verdict
from proxy.core.destination import DestinationCheck
from proxy.core.engine import BodyNeeded
from proxy.core.firstbytes import FirstBytes
from proxy.core.firstbytes import Protocol as FirstProtocol
from proxy.core.hosts import InvalidHost, canonical_host, parse_endpoint, split_authority
from proxy.core.requests import HttpHead
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


def request_target(target: str) -> str:
    """The origin-form target (path and query) of a URL, as a client sends it."""
    parts = urlsplit(target)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


async def check(
    policy: Policy,
    request: Request,
    *,
    resolve: bool = False,
    nameservers: list[str] | None = None,
    hosts_file: str | None = "/etc/hosts",
    listeners: list[tuple[str, int]] | None = None,
    body: bytes | None = None,
) -> Decision:
    """The decision the gate would make for ``request``; resolves only with ``resolve``.

    A ``Kind.REQUEST`` is decided as the gate decides a request inside an inspected tunnel: the
    CONNECT first (whose decision is the answer when it is refused, or when the host is not
    inspected), its ClientHello, then the request, with ``body`` where a rule reads it."""
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
    decision = await _admit(checkpoint, request, body)
    return would_ask.asked or decision


async def _admit(checkpoint: Checkpoint, request: Request, body: bytes | None) -> Decision:
    conn = Connection(peer=None, sandbox_id=None)
    if request.kind in (Kind.HTTP, Kind.REQUEST) and request.http is None:
        head = HttpHead(request.method or "GET", request.path or "/", body_size=len(body or b""))
        request = replace(request, http=head)
    if request.kind is Kind.REQUEST:
        tunnel = await checkpoint.admit(
            conn, Request(Kind.CONNECT, request.host, request.port, "CONNECT")
        )
        if not tunnel.allowed or not conn.inspected:
            return tunnel
        sni = tunnel.host if _is_name(tunnel.host) else None
        hello = checkpoint.admit_tunnel(conn, FirstBytes(FirstProtocol.TLS, sni=sni))
        if hello is not None and not hello.allowed:
            return hello
    outcome = await checkpoint.admit_request(conn, request)
    if isinstance(outcome, BodyNeeded):
        assert request.http is not None
        held = replace(request, http=request.http.with_body(body or b""))
        return await checkpoint.admit_body(conn, held)
    return outcome


class _WouldAsk:
    """The approver of a dry run: notes that the gate would hold the request for an approval (after
    every check before it passed), and answers nothing."""

    def __init__(self) -> None:
        self.asked: Decision | None = None

    async def answer(
        self,
        decision: Decision,
        rule: Any,
        record: Any,
        *,
        methods: tuple[str, ...] = (),
        query: str | None = None,
        body: bytes | None = None,
        runs: str | None = None,
        fields: Any = None,
        unread: int | None = 0,
    ) -> Decision:
        self.asked = decision
        return decision.with_(decision=Verdict.DENY, reason=Reason.APPROVAL_UNAVAILABLE)


def run(args: argparse.Namespace, policy: Policy) -> int:
    try:
        kind, host, port, method, path = parse_target(args.target, args.method)
        listeners = [parse_endpoint(spec) for spec in args.listen]
    except ValueError as exc:  # InvalidHost is a ValueError
        print(f"error: {escape(args.target)!r}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        body = _body(args.data)
    except OSError as exc:
        print(f"error: --data: {exc}", file=sys.stderr)
        return EXIT_ERROR
    request = Request(kind=Kind(kind), host=host, port=port, method=method, path=path)
    if kind in ("http", "connect") and "://" in args.target:
        # The request as the gate sees it: plain, or inside the tunnel when the host is inspected.
        target = request_target(args.target)
        method = (args.method or "GET").upper()
        head = HttpHead(method, target, body_size=len(body or b""), content_type=args.content_type)
        path, _, query = target.partition("?")
        request = Request(
            Kind.HTTP if kind == "http" else Kind.REQUEST,
            host,
            port,
            method,
            path,
            http=head,
            query=query or None,
        )
    decision = asyncio.run(
        check(
            policy,
            request,
            resolve=args.resolve,
            nameservers=args.nameserver,
            hosts_file=args.hosts_file or None,
            listeners=listeners,
            body=body,
        )
    )
    unresolved = decision.allowed and decision.address is None and _is_name(decision.host)
    # A dry run sees no process: a rule bound to executables refuses here as a gate that cannot
    # see processes does, and says what `egress run` would decide instead.
    by_process = decision.reason is Reason.PROCESS_UNATTRIBUTED
    if args.json:
        out = decision.to_dict()
        out["depends_on_dns"] = unresolved
        out["depends_on_process"] = by_process
        print(json.dumps(out, ensure_ascii=True))
    else:
        where = f"{decision.host}:{decision.port}"
        if decision.kind in (Kind.HTTP, Kind.REQUEST) and decision.method:
            where = f"{escape(decision.method)} {where}{escape(decision.path or '')}"
        print(
            f"{decision.decision.upper()} {where} rule={decision.rule or '-'} reason={decision.reason}"
        )
        if decision.detail:
            print(f"  {decision.detail}")
        if decision.address is not None and decision.allowed:
            print(f"  address: {decision.address}")
        if request.kind is Kind.REQUEST and decision.kind is Kind.CONNECT and decision.allowed:
            print(
                "  not inspected: no rule for this host reads requests, so the tunnel carries any "
                "request (method and path are not decided)"
            )
        if body is None and not decision.allowed and _reads_body(request, policy):
            print("  a rule for this request reads its body: give it with --data TEXT|@FILE")
        if (
            body is not None
            and not decision.allowed
            and request.http is not None
            and not is_json(request.http.content_type)
            and _has_json_rule(request, policy)
        ):
            print(
                "  a rule for this host reads a JSON body, which it matches only when declared "
                "JSON: give --content-type application/json"
            )
        if by_process:
            print(
                "  depends on the process: egress check sees none, so it refuses as `egress serve` "
                "does; under `egress run` only a process running one of those executables passes"
            )
        if unresolved:
            print(
                f"  depends on DNS: the gate resolves {decision.host} and refuses it if every "
                "address is internal; run with --resolve to check that too"
            )
    return EXIT_OK if decision.allowed else EXIT_DENY


def _reads_body(request: Request, policy: Policy) -> bool:
    from proxy.core.engine import decide_request

    return request.http is not None and isinstance(decide_request(request, policy), BodyNeeded)


def _has_json_rule(request: Request, policy: Policy) -> bool:
    """Whether an allow rule for the request's host reads a JSON body (for the hint only)."""
    if request.port is None:
        return False
    rules = policy.index.request_rules(request.host, request.port)
    return rules is not None and any(
        rule.request is not None and rule.request.reads_body for rule in rules.allow
    )


def _body(data: str | None) -> bytes | None:
    """``--data TEXT`` or ``--data @FILE``."""
    if data is None:
        return None
    if data.startswith("@"):
        return Path(data[1:]).read_bytes()
    return data.encode()


def _is_name(host: str) -> bool:
    try:
        return isinstance(canonical_host(host), str)
    except InvalidHost:
        return False


__all__ = ["check", "parse_target", "request_target", "run"]
