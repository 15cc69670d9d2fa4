"""From observed traffic to the smallest reviewable allowlist (``egress learn``).

Input: decision records (the audit journal's lines, or JSON decision-log lines). Only traffic that
actually flowed is learned: ``allow`` and ``report`` decisions whose reason is an allowlist outcome
(``allowed-by-rule``, ``approval-granted``, or a gap report mode let through). Refusals are counted
and named in the header, never proposed: an explicit deny rule or a safety refusal (internal address,
DNS failure, SNI mismatch, ...) is not a gap.

Output: a policy file (it loads: the proposal is checked by the loader before it is shown) whose rules
are grouped so a person can review them:

- host names are grouped by registrable domain (the Public Suffix List's "private suffix"); a
  domain becomes a wildcard (``*.domain``, or ``**.domain`` when its apex was seen too) only when at
  least ``group_at`` distinct subdomains were seen; a bare public suffix is never proposed;
- each rule lists the ports its hosts were seen on (hosts seen on different port sets get separate
  rules, so nothing is allowed on a port it was not seen on);
- where requests were read (inspected tunnels, plain HTTP), methods and path prefixes (``/first/**``)
  are proposed as request conditions;
- IP literals are proposed only as ``/32`` (``/128``) networks in rules marked ``IP LITERAL``, and
  internal addresses never;
- each rule and host carries a comment: how often it was seen, first and last time.

With a base policy, only what the base does not already allow is proposed (each observation is decided
against the base by the real engine).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.core.addresses import internal_range
from proxy.core.decision import Kind, Request, Verdict
from proxy.core.engine import decide
from proxy.core.hosts import InvalidHost, canonical_host
from proxy.core.requests import HttpHead
from proxy.core.text import escape
from proxy.policy.loader import METHOD

if TYPE_CHECKING:
    from proxy.policy.model import Policy

LEARNABLE_REASONS = frozenset(
    {
        "allowed-by-rule",
        "approval-granted",
        "no-matching-rule",
        "port-not-allowed",
        "request-not-allowed",
    }
)
LEARNABLE_VERDICTS = frozenset({"allow", "report"})
DEFAULT_GROUP_AT = 4
_SEGMENT = re.compile(r"^[A-Za-z0-9\-._~!$&'()+,=:@]+$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Seen:
    count: int = 0
    first: float = 0.0
    last: float = 0.0

    def add(self, ts: float) -> None:
        self.count += 1
        self.first = ts if not self.first else min(self.first, ts)
        self.last = max(self.last, ts)

    def merge(self, other: Seen) -> None:
        self.count += other.count
        self.first = other.first if not self.first else min(self.first, other.first)
        self.last = max(self.last, other.last)

    def comment(self) -> str:
        return f"seen {self.count}x, first {_when(self.first)}, last {_when(self.last)}"


def _when(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Observations:
    """What the records showed, keyed for grouping."""

    tunnels: dict[tuple[str, int], Seen] = field(default_factory=dict)  # (host, port)
    requests: dict[tuple[str, int, str, str], Seen] = field(default_factory=dict)  # +method, prefix
    dns_only: dict[str, Seen] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # reason -> count (not proposed)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it is not proposed
    records: int = 0
    decisions: int = 0


def _ts(record: Mapping[str, Any]) -> float:
    value = record.get("ts")
    return float(value) if isinstance(value, int | float) else 0.0


def path_prefix(path: str | None) -> str:
    """The glob a path is proposed under: its first segment and everything below (``/simple/**``)."""
    if not path or path == "/":
        return "/"
    first = path.split("?", 1)[0].lstrip("/").split("/", 1)[0]
    if not first or not _SEGMENT.match(first) or first in (".", ".."):
        return "/**"
    return f"/{first}/**"


def observe(
    records: Iterable[Mapping[str, Any]],
    *,
    since: float | None = None,
    sandbox: str | None = None,
) -> Observations:
    out = Observations()
    for record in records:
        out.records += 1
        if record.get("event", "egress.decision") != "egress.decision" or "decision" not in record:
            continue
        if since is not None and _ts(record) < since:
            continue
        if sandbox is not None and record.get("sandbox_id") != sandbox:
            continue
        out.decisions += 1
        verdict, reason = str(record.get("decision")), str(record.get("reason"))
        if verdict not in LEARNABLE_VERDICTS or reason not in LEARNABLE_REASONS:
            if verdict in ("deny", "ask"):
                out.refused[reason] = out.refused.get(reason, 0) + 1
            continue
        kind, host, port = record.get("kind"), record.get("host"), record.get("port")
        if not isinstance(host, str):
            continue
        try:
            canonical = canonical_host(host)
        except (InvalidHost, TypeError):
            continue
        if not isinstance(canonical, str) and internal_range(canonical) is not None:
            out.skipped[str(canonical)] = f"internal address ({internal_range(canonical)})"
            continue
        name = str(canonical)
        ts = _ts(record)
        if kind == Kind.DNS:
            out.dns_only.setdefault(name, Seen()).add(ts)
            continue
        if not isinstance(port, int) or kind == Kind.TLS:
            continue
        if kind in (Kind.REQUEST, Kind.HTTP) and isinstance(record.get("method"), str):
            method = str(record["method"]).upper()
            if not METHOD.fullmatch(method):
                # the sandbox's word, not a method a rule can name: YAML syntax, or a list
                # ("GET, DELETE") that would propose a method nobody sent
                out.skipped[f"{method!r} on {name}:{port}"] = "it is not an HTTP method"
                continue
            key = (name, port, method, path_prefix(record.get("path")))
            out.requests.setdefault(key, Seen()).add(ts)
            continue
        out.tunnels.setdefault((name, port), Seen()).add(ts)
    requested = {(h, p) for h, p, _, _ in out.requests}
    for name in list(out.dns_only):
        if any(h == name for h, _ in out.tunnels) or any(h == name for h, _ in requested):
            del out.dns_only[name]
    return out


@functools.cache
def _psl() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def registrable(name: str) -> str | None:
    """The registrable domain of ``name`` (``a.b.pypi.org`` -> ``pypi.org``); None for a public
    suffix itself (``com``, ``github.io``) or an IP address."""
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    found = _psl().privatesuffix(name)
    return str(found) if found else None


@dataclass
class Proposal:
    """The proposed rules as text blocks, and what was left out and why."""

    blocks: list[str]
    notes: list[str]
    rules: int


def _allowed_by(base: Policy | None, request: Request) -> bool:
    if base is None:
        return False
    return decide(request, base).decision is Verdict.ALLOW


def _rule_name(stem: str, used: set[str]) -> str:
    base = _NAME_CHARS.sub("-", stem).strip("-.") or "learned"
    base = base[:56]
    name, n = base, 2
    while name in used:
        name = f"{base}-{n}"
        n += 1
    used.add(name)
    return name


def propose(
    seen: Observations,
    *,
    min_count: int = 1,
    base: Policy | None = None,
    group_at: int = DEFAULT_GROUP_AT,
) -> Proposal:
    notes: list[str] = []
    blocks: list[str] = []
    used: set[str] = set(r.name for r in base.rules) if base is not None else set()
    # -- requests (inspected hosts): host -> {(method, prefix): Seen}
    inspected: dict[tuple[str, int], dict[tuple[str, str], Seen]] = {}
    for (host, port, method, prefix), s in seen.requests.items():
        if s.count < min_count:
            notes.append(
                f"left out {method} {host}:{port}{prefix} ({s.comment()}; below --min-count)"
            )
            continue
        path = prefix.replace("/**", "/") if prefix != "/**" else "/"
        request = Request(Kind.REQUEST, host, port, method, path, http=HttpHead(method, path))
        if _allowed_by(base, request):
            continue
        inspected.setdefault((host, port), {})[(method, prefix)] = s
    # -- tunnels: (host, port) not covered by request rules
    tunnels: dict[str, dict[int, Seen]] = {}
    for (host, port), s in seen.tunnels.items():
        if (host, port) in inspected:
            continue
        if s.count < min_count:
            notes.append(f"left out {host}:{port} ({s.comment()}; below --min-count)")
            continue
        if _allowed_by(base, Request(Kind.CONNECT, host, port, "CONNECT")):
            continue
        tunnels.setdefault(host, {})[port] = s
    # IP literals: flagged rules of their own
    for host in sorted(h for h in tunnels if registrable(h) is None and _is_ip(h)):
        ports = tunnels.pop(host)
        net = ipaddress.ip_network(host)
        total = _total(ports.values())
        name = _rule_name(f"ip-{host}", used)
        blocks.append(
            "\n".join(
                [
                    f"  # IP LITERAL: the agent connected to an address, not a name ({total.comment()}).",
                    "  # Prefer the host name if there is one; review before allowing an address.",
                    f"  - name: {name}",
                    f"    description: learned; IP literal {host}",
                    f'    cidrs: ["{net}"]',
                    f"    ports: [{', '.join(str(p) for p in sorted(ports))}]",
                ]
            )
        )
    # public suffixes themselves are never proposed
    for host in sorted(h for h in tunnels if registrable(h) is None):
        notes.append(f"not proposed: {host} is a public suffix (anyone can register below it)")
        del tunnels[host]
    # group by registrable domain, then by the port set
    by_domain: dict[str, dict[str, dict[int, Seen]]] = {}
    for host, ports in tunnels.items():
        domain = registrable(host)
        assert domain is not None
        by_domain.setdefault(domain, {})[host] = ports
    for domain in sorted(by_domain):
        hosts = by_domain[domain]
        subs = [h for h in hosts if h != domain]
        if len(subs) >= group_at:
            pattern = f"**.{domain}" if domain in hosts else f"*.{domain}"
            ports_all: dict[int, Seen] = {}
            for ports in hosts.values():
                for port, s in ports.items():
                    ports_all.setdefault(port, Seen()).merge(s)
            lines = [
                f"  # {domain}: {len(subs)} subdomains seen, grouped as {pattern} "
                f"({_total(ports_all.values()).comment()})",
                f"  - name: {_rule_name(domain, used)}",
                "    hosts:",
                f'      - "{pattern}"',
            ]
            for host in sorted(hosts):
                lines.append(f"      # {host}: {_total(hosts[host].values()).comment()}")
            lines.append(f"    ports: [{', '.join(str(p) for p in sorted(ports_all))}]")
            blocks.append("\n".join(lines))
            continue
        by_ports: dict[tuple[int, ...], list[str]] = {}
        for host, ports in hosts.items():
            by_ports.setdefault(tuple(sorted(ports)), []).append(host)
        for port_set, members in sorted(by_ports.items()):
            total = _total(s for h in members for s in hosts[h].values())
            lines = [
                f"  # {domain} ({total.comment()})",
                f"  - name: {_rule_name(domain, used)}",
                "    hosts:",
            ]
            for host in sorted(members):
                lines.append(f'      - "{host}"  # {_total(hosts[host].values()).comment()}')
            lines.append(f"    ports: [{', '.join(str(p) for p in port_set)}]")
            blocks.append("\n".join(lines))
    # request rules: per host and port, prefixes grouped by their method sets
    for (host, port), seen_requests in sorted(inspected.items()):
        by_prefix: dict[str, dict[str, Seen]] = {}
        for (method, prefix), s in seen_requests.items():
            by_prefix.setdefault(prefix, {})[method] = s
        by_methods: dict[tuple[str, ...], list[str]] = {}
        for prefix, per_method in by_prefix.items():
            by_methods.setdefault(tuple(sorted(per_method)), []).append(prefix)
        for methods, prefixes in sorted(by_methods.items()):
            total = _total(by_prefix[p][m] for p in prefixes for m in methods)
            lines = [
                f"  # requests to {host}:{port} ({total.comment()})",
                f"  - name: {_rule_name(f'{host}-requests', used)}",
                f'    hosts: ["{host}"]',
                f"    ports: [{port}]",
                f"    methods: [{', '.join(methods)}]",
                "    paths:",
            ]
            for prefix in sorted(prefixes):
                each = _total(by_prefix[prefix].values())
                lines.append(f'      - "{prefix}"  # {each.comment()}')
            blocks.append("\n".join(lines))
    for name, s in sorted(seen.dns_only.items()):
        notes.append(f"seen in DNS only, not proposed: {name} ({s.comment()})")
    for target, why in sorted(seen.skipped.items()):
        notes.append(f"never proposed: {escape(target)}: {why}")
    for reason, count in sorted(seen.refused.items()):
        notes.append(f"refused and not proposed: {count} decision(s) {escape(reason)}")
    return Proposal(blocks, notes, len(blocks))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _total(items: Iterable[Seen]) -> Seen:
    out = Seen()
    for s in items:
        out.merge(s)
    return out


def _comment(text: str) -> str:
    """A YAML comment line holding ``text``: a line break in it (newline, carriage return, NEL,
    line or paragraph separator), or any other character that is not printable, is escaped, so
    nothing read from a record or a file name ends the comment and becomes policy text."""
    if not text:
        return "#"
    return f"# {text if text.isprintable() else escape(text, 4096)}"


def render(proposal: Proposal, header: Iterable[str]) -> str:
    """The proposal as a policy file: header and notes as comments, then the rules."""
    lines = [_comment(line) for line in header]
    lines += [_comment(note) for note in proposal.notes]
    lines.append("version: 1")
    if not proposal.blocks:
        lines.append("rules: []  # nothing to propose")
        return "\n".join(lines) + "\n"
    lines.append("rules:")
    for block in proposal.blocks:
        lines.append(block)
    return "\n".join(lines) + "\n"
