"""The policy model: rules, host patterns and the problems that stop a policy from loading.

Everything here is immutable and already canonical (punycode, lower case, networks without host bits) so
the engine never re-interprets what a user wrote: a pattern is checked once, at load, and from then on is
a dictionary key. ``Policy`` compiles its index when it is built, so a Policy that exists is always ready
to answer ``decide`` in time independent of its size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.core.hosts import InvalidHost, canonical_host
from proxy.core.paths import PathGlob
from proxy.policy.executables import Executable
from proxy.policy.index import RuleIndex

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

DEFAULT_PORTS: frozenset[int] = frozenset({443})


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"  # hold the request until a person (or, with ``review: auto``, the reviewer) answers


class Review(StrEnum):
    """Who may answer an ``ask`` rule: only a person, or also the automated reviewer."""

    HUMAN = "human"
    AUTO = "auto"


DEFAULT_ASK_TIMEOUT = 60  # seconds an ask rule holds a request before refusing it
# A held connection is idle to mitmproxy, which closes connections idle for its tcp_timeout (600 s):
# a longer wait would end with a closed connection instead of a clear approval-timeout.
MAX_ASK_TIMEOUT = 540


class Mode(StrEnum):
    ENFORCE = "enforce"
    REPORT = (
        "report"  # policy denials are recorded but traffic proceeds; safety refusals still deny
    )


class PatternKind(StrEnum):
    EXACT = "exact"  # example.com: that name only
    SUB = "sub"  # *.example.com: any subdomain at any depth, not the apex
    TREE = "tree"  # **.example.com: the apex and any subdomain


_PREFIX = {PatternKind.EXACT: "", PatternKind.SUB: "*.", PatternKind.TREE: "**."}


@dataclass(frozen=True, slots=True)
class HostPattern:
    kind: PatternKind
    base: str  # canonical host name (punycode, lower case, no trailing dot)

    def __str__(self) -> str:
        return _PREFIX[self.kind] + self.base


# Names under which anyone can get a subdomain that the Public Suffix List does not (yet) carry. A
# wildcard over one of them would allow every tenant of the service, attackers included. Remove an entry
# once the list has it (a test says when).
UNLISTED_PUBLIC_SUFFIXES = frozenset({"loca.lt"})  # localtunnel


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The maintained Public Suffix List (``publicsuffixlist`` ships a recent copy), with its private
    section (github.io, pages.dev, ...). Parsed once (~70 ms), and only when a wildcard is checked."""
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def is_public_suffix(name: str) -> bool:
    """True for names anyone can register below (com, co.uk, github.io) and for unknown TLDs.

    Unknown single labels count as public suffixes (the list's implicit ``*`` rule): ``*.internal`` is as
    wide as ``*.com`` from a policy's point of view.
    """
    return name in UNLISTED_PUBLIC_SUFFIXES or bool(_public_suffixes().is_public(name))


def parse_host_pattern(text: str) -> HostPattern:
    """Check and canonicalise one entry of a rule's ``hosts``; ValueError says what is wrong with it."""
    raw = text.strip()
    if raw in ("*", "**", "*.", "**."):
        raise ValueError(f"{text!r} matches every host; list the hosts instead")
    if raw.startswith("**."):
        kind, rest = PatternKind.TREE, raw[3:]
    elif raw.startswith("*."):
        kind, rest = PatternKind.SUB, raw[2:]
    else:
        kind, rest = PatternKind.EXACT, raw
    if "*" in rest:
        raise ValueError(
            f"{text!r}: '*' is only allowed as a whole leading label ('*.example.com' or "
            "'**.example.com')"
        )
    try:
        base = canonical_host(rest)
    except InvalidHost as exc:
        raise ValueError(f"{text!r} is not a valid host name: {exc}") from None
    if not isinstance(base, str):
        raise ValueError(f"{text!r} is an IP address; IP destinations are matched by 'cidrs' only")
    if kind is not PatternKind.EXACT and is_public_suffix(base):
        raise ValueError(
            f"{text!r} would match every site under the public suffix {base!r}; "
            "list the sites instead"
        )
    return HostPattern(kind, base)


GRAPHQL_OPERATIONS = frozenset({"query", "mutation", "subscription"})


@dataclass(frozen=True, slots=True)
class RequestConditions:
    """What a rule asks of each HTTP request on its hosts; a request matches when all of them hold.

    ``None`` (or empty) means "not a condition". Values are canonical: methods upper case, globs
    compiled, query and JSON values as sets of accepted strings.
    """

    methods: frozenset[str] | None = None
    paths: tuple[PathGlob, ...] | None = None
    query: tuple[tuple[str, frozenset[str]], ...] = ()
    # None: an allow rule allows plain requests only (an upgrade needs websocket: true), a deny rule
    # refuses both
    websocket: bool | None = None
    max_request_bytes: int | None = None
    graphql_operations: frozenset[str] | None = None
    json_body: tuple[tuple[str, frozenset[str]], ...] = ()

    @property
    def reads_body(self) -> bool:
        """The rule cannot be decided from the request head alone."""
        return self.graphql_operations is not None or bool(self.json_body)


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny rule, as loaded. ``ports=None`` means every port.

    The loader gives allow rules ``{443}`` and deny rules ``None`` when the file lists no ports; code
    that builds rules directly must pass ``ports=None`` for a deny-every-port rule itself.

    ``request`` holds the rule's request conditions. A rule with conditions, or with ``inspect``, makes
    the gate read every request to its hosts (TLS is terminated for them): a deny rule with conditions
    then refuses only the requests it matches, and an allow rule allows only those. On such a host a
    rule without conditions allows every request.
    """

    name: str
    action: Action = Action.ALLOW
    hosts: tuple[HostPattern, ...] = ()
    cidrs: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] | None = (
        DEFAULT_PORTS  # None: every port (only deny rules may omit ports)
    )
    file: str = ""
    line: int = 0
    description: str | None = None
    request: RequestConditions | None = None
    inspect: bool = False

    @property
    def reads_requests(self) -> bool:
        """Requests to this rule's hosts are read one by one (TLS terminated)."""
        return self.request is not None or self.inspect

    timeout: int = DEFAULT_ASK_TIMEOUT  # ask rules: seconds to wait for an answer
    review: Review = Review.HUMAN  # ask rules: whether the automated reviewer may answer
    # The rule's own mode; None follows the policy's. ``report`` on a deny rule records what it would
    # refuse instead of refusing it; on an allow rule it reports the gaps it is nearest to (other
    # ports, requests no request rule allows). See docs/lifecycle.md.
    mode: Mode | None = None
    # Only connections whose process runs one of these files (proxy.policy.executables): empty
    # means any process.
    executables: tuple[Executable, ...] = ()

    def ports_text(self) -> str:
        """The ports as refusal messages phrase them: ``port 443``, ``ports 80, 443``, ``every port``."""
        if self.ports is None:
            return "every port"
        ports = sorted(self.ports)
        return ("port " if len(ports) == 1 else "ports ") + ", ".join(str(p) for p in ports)


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a policy file cannot be loaded, located precisely enough to fix without searching."""

    file: str
    line: int | None
    rule: str | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        parts = [where]
        if self.rule is not None:
            parts.append(
                f"rule {self.rule}" if self.rule.startswith("#") else f"rule '{self.rule}'"
            )
        if self.key is not None:
            parts.append(f"key '{self.key}'")
        parts.append(self.message)
        return ": ".join(parts)


class PolicyError(Exception):
    """A policy that failed to load; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem], path: str | None = None) -> None:
        self.problems = list(problems)
        self.path = path  # the file that was asked for (problems may be in files it includes)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid policy")

    def lines(self) -> list[str]:
        """What every command and log shows: each problem on a line, then the verdict on the file."""
        refused = f"refusing to load {self.path}" if self.path else "refusing to load the policy"
        return [*(str(p) for p in self.problems), f"{refused}: {len(self.problems)} problem(s)"]


@dataclass(frozen=True, slots=True)
class Policy:
    version: str
    mode: Mode
    rules: tuple[Rule, ...]
    allow_internal: tuple[IPNetwork, ...] = ()
    files: tuple[Path, ...] = ()
    index: RuleIndex = field(init=False, repr=False, compare=False)
    # Every file as the load named it, symlinks unresolved (the top file as given, each include
    # beside the file naming it): a symlink re-pointed at another file changes what the next load
    # reads though no file in ``files`` changed, so live reload watches these too.
    named: tuple[Path, ...] = field(default=(), repr=False, compare=False)
    # The managed policy this one was checked against (proxy.policy.managed): a ``report`` decision
    # it would not allow is a denial, so report mode never widens past the organisation's ceiling.
    ceiling: Policy | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", RuleIndex(self.rules))

    @property
    def reads_requests(self) -> bool:
        """Some host's requests are read (its TLS terminated): clients must trust the gate's CA."""
        return any(rule.reads_requests for rule in self.rules)

    @property
    def every_rule(self) -> tuple[Rule, ...]:
        """This policy's rules and its managed ceiling's (which hold a report to them too)."""
        ceiling = self.ceiling
        return (*self.rules, *(ceiling.rules if ceiling is not None else ()))

    @property
    def binds_executables(self) -> bool:
        """Some rule, here or in the ceiling, holds to the program behind a connection: the gate
        must name that program as the connection opens (``egress run`` releases such a policy's
        command only once its gate serves)."""
        return any(rule.executables for rule in self.every_rule)

    def rule(self, name: str | None) -> Rule | None:
        """The rule a decision names (names are unique in a policy), or None."""
        return next((r for r in self.rules if r.name == name), None)
