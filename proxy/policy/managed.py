"""The managed ceiling: an organisation's policy that a local (team) policy may only narrow.

The managed file is an ordinary policy file with one more top-level section, ``managed:``::

    version: 1
    managed:
      forbid: [report-mode, allow-internal, inspection-opt-out]
    allow_internal: [10.20.0.0/16]     # the ranges a local allow_internal may name (a ceiling too)
    rules:
      - name: registries               # allow and ask rules: the ceiling
        hosts: ["**.pypi.org", files.pythonhosted.org]
      - name: no-paste                 # deny rules: always enforced, whatever the local policy says
        action: deny
        hosts: ["**.pastebin.com"]

What the gate enforces (the *effective* policy) is the local policy's rules plus every managed deny
rule, so a managed deny always wins (deny beats allow in the decision order). At load, every local
``allow`` and ``ask`` rule must be *covered*: each of its hosts, networks and ports lies inside one
managed rule, an ``ask`` may sit under a managed ``allow`` or ``ask`` but a local ``allow`` only under a
managed ``allow`` (it would skip the question), an ``ask`` under a managed ``ask`` that a person answers
may not hand the question to the automated reviewer (``review: auto``), under a managed rule bound to
executables a local rule must be bound to some of them (the same files), and where the managed rule
reads requests (request conditions) the local rule must have conditions at least as narrow. A rule that is not
covered stops the load with a problem naming the local file, line and rule and the managed file, line
and rule nearest to it. The question and the executables are those of the managed rule that
*decides* each name (the most specific one, as the gate decides): a broader managed allow never stands
in for a narrower managed ask or binding. Approvals answer ``ask`` rules only, so they can never grant beyond the ceiling either.

Report mode must not widen past the ceiling: a local ``report`` decision (policy or rule mode) that the
managed policy would not allow is a denial (see :func:`proxy.core.engine` and ``Policy.ceiling``), and
one the managed policy allows only for some executables is held to them (checkpoint step 3a).

``forbid`` closes three doors: ``report-mode`` (no ``mode: report`` in the local policy, top level or
rule), ``allow-internal`` (no local ``allow_internal`` at all; without it, local ranges must lie inside
the managed ``allow_internal``) and ``inspection-opt-out`` (a local rule under a managed rule that reads
requests, ``inspect: true`` included, must read requests too). The managed file itself must be in
enforce mode. The effective version is a hash over both layers' versions, so every decision names both.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from proxy.policy import yamlnodes
from proxy.policy.index import RuleIndex
from proxy.policy.loader import display_path, load_policy, read_regular
from proxy.policy.model import (
    Action,
    HostPattern,
    IPNetwork,
    Mode,
    PatternKind,
    Policy,
    PolicyError,
    Problem,
    RequestConditions,
    Review,
    Rule,
)
from proxy.policy.yamlnodes import MappingNode, Node, ScalarNode, SequenceNode

FORBIDDABLE = ("report-mode", "allow-internal", "inspection-opt-out")
MANAGED_KEYS = frozenset({"forbid", "description"})


@dataclass(frozen=True)
class Managed:
    """A loaded managed policy: its rules (as a Policy, enforce mode) and what it forbids."""

    policy: Policy
    path: str
    forbid: frozenset[str]

    @property
    def denies(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.policy.rules if r.action is Action.DENY)

    @property
    def ceiling(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.policy.rules if r.action is not Action.DENY)

    @functools.cached_property
    def below(self) -> dict[str, tuple[Rule, ...]]:
        """Name -> the ceiling rules with a pattern for a name strictly below it (each once, in
        policy order): the rules that decide some of the names a ``*.name`` pattern matches."""
        found: dict[str, dict[str, Rule]] = {}
        for rule in self.ceiling:
            for pattern in rule.hosts:
                base = pattern.base
                dot = base.find(".")
                while dot >= 0:
                    found.setdefault(base[dot + 1 :], {}).setdefault(rule.name, rule)
                    dot = base.find(".", dot + 1)
        return {name: tuple(rules.values()) for name, rules in found.items()}


def load_managed(path: str | os.PathLike[str]) -> Managed:
    """Load the managed policy; PolicyError (every problem) when it does not load, is unreadable, or
    asks for report mode itself. The ``managed:`` section is read here and hidden from the loader."""
    target = Path(path)
    shown = display_path(target.resolve()) if target.exists() else str(target)
    try:
        text = read_regular(target).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyError(
            [Problem(shown, None, None, None, f"cannot read the managed policy: {reason}")], shown
        ) from None
    forbid, problems = _managed_section(text, shown)
    policy: Policy | None = None
    try:
        policy = load_policy(target, managed=True)
    except PolicyError as exc:
        problems += exc.problems
    if policy is not None and policy.mode is not Mode.ENFORCE:
        problems.append(
            Problem(shown, None, None, "mode", "a managed policy is enforced; drop 'mode: report'")
        )
    if policy is not None:
        problems += _reporting_rules(policy, "a managed rule is enforced; drop 'mode: report'")
    if problems or policy is None:
        raise PolicyError(problems, shown)
    return Managed(policy, shown, forbid)


def _reporting_rules(policy: Policy, message: str) -> list[Problem]:
    """A problem for each rule of ``policy`` in report mode."""
    return [
        Problem(rule.file, rule.line, rule.name, "mode", message)
        for rule in policy.rules
        if rule.mode is Mode.REPORT
    ]


def _managed_section(text: str, shown: str) -> tuple[frozenset[str], list[Problem]]:
    """(forbid, problems) from the managed file's ``managed:`` mapping."""
    problems: list[Problem] = []
    try:
        root = yamlnodes.compose(text)
    except yamlnodes.YAMLError:
        return frozenset(), problems  # the loader reports the syntax error with its line
    if not isinstance(root, MappingNode):
        return frozenset(), problems
    section: tuple[Node, Node] | None = None
    for key, value in root.value:
        if isinstance(key, ScalarNode) and key.value == "managed":
            section = (key, value)
    if section is None:
        return frozenset(), problems
    key, value = section
    forbid: set[str] = set()
    if not isinstance(value, MappingNode):
        problems.append(
            Problem(shown, key.start_mark.line + 1, None, "managed", "expected a mapping")
        )
    else:
        for k, v in value.value:
            name = k.value if isinstance(k, ScalarNode) else None
            line = k.start_mark.line + 1
            if name not in MANAGED_KEYS:
                problems.append(
                    Problem(
                        shown,
                        line,
                        None,
                        f"managed.{name}",
                        f"unknown key (expected one of: {', '.join(sorted(MANAGED_KEYS))})",
                    )
                )
                continue
            if name != "forbid":
                continue
            items = v.value if isinstance(v, SequenceNode) else None
            if items is None:
                problems.append(Problem(shown, line, None, "managed.forbid", "expected a list"))
                continue
            for item in items:
                word = item.value if isinstance(item, ScalarNode) else None
                if word not in FORBIDDABLE:
                    problems.append(
                        Problem(
                            shown,
                            item.start_mark.line + 1,
                            None,
                            "managed.forbid",
                            f"{word!r} is not one of: {', '.join(FORBIDDABLE)}",
                        )
                    )
                else:
                    forbid.add(word)
    return frozenset(forbid), problems


# -- coverage ---------------------------------------------------------------------------------------


def _name_in(name: str, base: str) -> bool:
    return name == base or name.endswith("." + base)


def _pattern_covered(local: HostPattern, managed: HostPattern) -> bool:
    """Every name ``local`` matches, ``managed`` matches."""
    lb, mb = local.base, managed.base
    if managed.kind is PatternKind.EXACT:
        return local.kind is PatternKind.EXACT and lb == mb
    if managed.kind is PatternKind.SUB:  # strict subdomains of mb
        if local.kind is PatternKind.EXACT:
            return lb != mb and _name_in(lb, mb)
        if local.kind is PatternKind.SUB:
            return _name_in(lb, mb)
        return lb != mb and _name_in(lb, mb)  # TREE: its apex must be a strict subdomain
    return _name_in(lb, mb)  # managed TREE covers the apex and everything below


def _pieces(pattern: HostPattern) -> list[HostPattern]:
    """A ``**.`` pattern is its apex and its subdomains: each may be covered by a different rule."""
    if pattern.kind is PatternKind.TREE:
        return [
            HostPattern(PatternKind.EXACT, pattern.base),
            HostPattern(PatternKind.SUB, pattern.base),
        ]
    return [pattern]


def _net_covered(local: IPNetwork, managed: IPNetwork) -> bool:
    if isinstance(local, IPv4Network) and isinstance(managed, IPv4Network):
        return local.subnet_of(managed)
    if isinstance(local, IPv6Network) and isinstance(managed, IPv6Network):
        return local.subnet_of(managed)
    return False


def conditions_narrower(local: RequestConditions | None, managed: RequestConditions) -> str | None:
    """None when every request ``local`` allows, ``managed`` allows too; else what is wider."""
    if local is None:
        return "the managed rule allows only some requests; this rule allows every request"
    if managed.methods is not None and (
        local.methods is None or not local.methods <= managed.methods
    ):
        return f"methods must be among {sorted(managed.methods)}"
    if managed.paths is not None:
        allowed = {(g.text, g.insensitive) for g in managed.paths}
        if local.paths is None or any((g.text, g.insensitive) not in allowed for g in local.paths):
            return f"paths must be among {[g.text for g in managed.paths]}"
    for what, mine, theirs in (
        ("query", local.query, managed.query),
        ("json_body", local.json_body, managed.json_body),
    ):
        have = dict(mine)
        for name, accepted in theirs:
            if name not in have or not have[name] <= accepted:
                return f"{what} must require {name} in {sorted(accepted)}"
    if managed.graphql_operations is not None and (
        local.graphql_operations is None
        or not local.graphql_operations <= managed.graphql_operations
    ):
        return f"graphql_operations must be among {sorted(managed.graphql_operations)}"
    if bool(local.websocket) != bool(managed.websocket):
        return "websocket must match the managed rule"
    if managed.max_request_bytes is not None and (
        local.max_request_bytes is None or local.max_request_bytes > managed.max_request_bytes
    ):
        return f"max_request_bytes must be at most {managed.max_request_bytes}"
    return None


def _where(rule: Rule) -> str:
    return f"{rule.file}:{rule.line} rule '{rule.name}'"


def _decides_wider(local: Rule, target: str, m: Rule) -> str | None:
    """Why ``local`` would let through more than the managed rule ``m`` where ``m`` decides: an
    allow where it asks, the automated reviewer where it asks a person, or processes it does not
    name; None when it would not."""
    if local.action is Action.ALLOW and m.action is Action.ASK:
        return f"the managed {_where(m)} asks for {target}: a local rule may ask too, not allow"
    if m.action is Action.ASK and m.review is Review.HUMAN and local.review is not Review.HUMAN:
        return (
            f"the managed {_where(m)} asks a person about {target}: a local rule may not let "
            "the automated reviewer answer (drop 'review: auto')"
        )
    if m.executables and not (local.executables and set(local.executables) <= set(m.executables)):
        only = ", ".join(e.path for e in m.executables)
        return (
            f"the managed {_where(m)} allows {target} only for {only}: bind this rule to "
            "those executables (or some of them)"
        )
    return None


def _covering(
    local: Rule, target: str, port: int, managed: Managed, matches: Iterable[Rule]
) -> tuple[bool, str | None]:
    """(covered, why not, naming the nearest managed rule) for one host piece or network and port."""
    nearest: str | None = None
    for m in matches:
        if m.ports is not None and port not in m.ports:
            nearest = nearest or (
                f"the managed {_where(m)} covers {target} on {m.ports_text()} only"
            )
            continue
        wider = _decides_wider(local, target, m)
        if wider is not None:
            nearest = nearest or wider
            continue
        if m.request is not None:
            wider = conditions_narrower(local.request, m.request)
            if wider is not None:
                nearest = nearest or f"the managed {_where(m)} reads requests to {target}: {wider}"
                continue
        if m.inspect and not local.reads_requests and "inspection-opt-out" in managed.forbid:
            nearest = nearest or (
                f"the managed {_where(m)} inspects {target} and forbids inspection opt-outs: "
                "add 'inspect: true' (or request conditions)"
            )
            continue
        return True, None
    return False, nearest


def _on_port(rule: Rule, port: int) -> bool:
    return rule.ports is None or port in rule.ports


def _host_deciders(
    piece: HostPattern,
    port: int,
    managed: Managed,
    matches: list[Rule],
    decides: Callable[[str], bool] | None = None,
) -> list[Rule]:
    """The managed rules that decide some name ``piece`` matches on ``port``: the most specific of
    the rules covering the whole piece (``matches``; the gate decides a name by its most specific
    rule, so a broader managed allow does not stand in for a narrower managed ask or binding), and
    every rule for a name below the piece's base (``*.x`` under a managed ``secret.x``) that the
    local rule itself decides there (``decides``: a more specific local ask or deny for
    ``secret.x`` decides that name instead, and is held to the ceiling on its own)."""
    covering = [
        replace(m, hosts=tuple(h for h in m.hosts if _pattern_covered(piece, h)), cidrs=())
        for m in matches
        if _on_port(m, port)
    ]
    below = managed.below
    probe = piece.base
    if piece.kind is not PatternKind.EXACT:  # a name below the base that no managed pattern names
        label = 0
        while any(
            h.base == f"x{label}.{piece.base}" for m in below.get(piece.base, ()) for h in m.hosts
        ):
            label += 1
        probe = f"x{label}.{piece.base}"
    found = RuleIndex(covering).match_name(probe, port).allow
    deciders = [] if found is None else [found]
    if piece.kind is not PatternKind.EXACT:
        deciders += [
            m
            for m in below.get(piece.base, ())
            if _on_port(m, port)
            and (decides is None or any(decides(name) for name in _names_of(m, piece.base)))
        ]
    return deciders


def _names_of(rule: Rule, base: str) -> Iterator[str]:
    """Names ``rule``'s patterns below ``base`` match: a pattern's own name where it matches it,
    and a name below it (``x.secret.x`` for ``*.secret.x``)."""
    for h in rule.hosts:
        if h.base.endswith(f".{base}"):
            if h.kind is not PatternKind.SUB:
                yield h.base
            if h.kind is not PatternKind.EXACT:
                yield f"x.{h.base}"


def _net_deciders(
    net: IPNetwork,
    port: int,
    ceiling: tuple[Rule, ...],
    matches: list[Rule],
    decides: Callable[[IPNetwork], bool] | None = None,
) -> list[Rule]:
    """:func:`_host_deciders` for a network: the longest managed prefix holding all of it, and
    every managed rule for a network inside it that the local rule itself decides there."""
    covering = [
        replace(m, hosts=(), cidrs=tuple(c for c in m.cidrs if _net_covered(net, c)))
        for m in matches
        if _on_port(m, port)
    ]
    found = RuleIndex(covering).match_value(net.version, int(net.network_address), port).allow
    deciders = [] if found is None else [found]
    deciders += [
        m
        for m in ceiling
        if _on_port(m, port)
        and any(
            c != net and _net_covered(c, net) and (decides is None or decides(c)) for c in m.cidrs
        )
    ]
    return deciders


def _decided_wider(
    local: Rule, target: str, deciders: Iterable[Rule], names: dict[str, Rule]
) -> str | None:
    """Why ``local`` would let through more than one of the managed rules that decide its names."""
    for m in deciders:
        wider = _decides_wider(local, target, names[m.name])
        if wider is not None:
            return wider
    return None


def ceiling_problems(local: Policy, managed: Managed) -> list[Problem]:
    """Every way ``local`` is wider than ``managed`` allows, each naming both places."""
    problems: list[Problem] = []
    mpath = managed.path
    forbid = managed.forbid
    if "report-mode" in forbid:
        forbidden = f"report mode is forbidden by the managed policy {mpath}"
        if local.mode is Mode.REPORT:
            problems.append(Problem(_first_file(local), None, None, "mode", forbidden))
        problems += _reporting_rules(local, forbidden)
    for net in local.allow_internal:
        if "allow-internal" in forbid:
            why = f"{net}: allow_internal is forbidden by the managed policy {mpath}"
        elif not any(_net_covered(net, m) for m in managed.policy.allow_internal):
            why = f"{net} is not inside the managed policy's allow_internal ({mpath})"
        else:
            continue
        problems.append(Problem(_first_file(local), None, None, "allow_internal", why))
    names = {r.name: r for r in managed.policy.rules}
    index = RuleIndex(local.rules)
    for rule in local.rules:
        if rule.name in names:
            problems.append(
                Problem(
                    rule.file,
                    rule.line,
                    rule.name,
                    "name",
                    f"the managed {_where(names[rule.name])} has this name; rename the local rule",
                )
            )
        if rule.action is Action.DENY:
            continue
        problems += _rule_problems(rule, managed, index)
    return problems


def _first_file(policy: Policy) -> str:
    return display_path(policy.files[0]) if policy.files else "the local policy"


@dataclass(frozen=True)
class Gap:
    """Part of a rule another policy does not cover: a host pattern or network on a port (0: the
    rule lists none), and why not (naming the nearest rule), when one came close."""

    rule: Rule
    key: str  # hosts | cidrs
    target: str
    port: int
    why: str | None

    @property
    def where(self) -> str:
        return f"{self.target} port {self.port}" if self.port else self.target


def rule_gaps(rule: Rule, managed: Managed, local: RuleIndex | None = None) -> list[Gap]:
    """What of an allow or ask ``rule`` the managed (or any other) policy does not cover. ``local``:
    the index of the policy ``rule`` is in, which decides the names below its patterns (without
    it, every managed rule for such a name is held against ``rule``)."""
    decides = None if local is None else functools.partial(_decided_by, local, rule)

    out: list[Gap] = []
    ports = sorted(rule.ports) if rule.ports is not None else [0]
    ceiling = managed.ceiling
    names = {m.name: m for m in ceiling}
    for pattern in rule.hosts:
        gap = None
        for piece in _pieces(pattern):
            matches = [m for m in ceiling if any(_pattern_covered(piece, h) for h in m.hosts)]
            for port in ports:
                ok, why = _covering(rule, str(pattern), port, managed, matches)
                if ok:
                    by_rule = None if decides is None else functools.partial(decides, port=port)
                    deciders = _host_deciders(piece, port, managed, matches, by_rule)
                    why = _decided_wider(rule, str(pattern), deciders, names)
                    ok = why is None
                if not ok:
                    gap = Gap(rule, "hosts", str(pattern), port, why)
                    break
            if gap is not None:
                break
        if gap is not None:
            out.append(gap)
    for net in rule.cidrs:
        matches = [m for m in ceiling if any(_net_covered(net, c) for c in m.cidrs)]
        for port in ports:
            ok, why = _covering(rule, str(net), port, managed, matches)
            if ok:
                by_rule = None if local is None else functools.partial(_net_by, local, rule, port)
                deciders = _net_deciders(net, port, ceiling, matches, by_rule)
                why = _decided_wider(rule, str(net), deciders, names)
                ok = why is None
            if not ok:
                out.append(Gap(rule, "cidrs", str(net), port, why))
                break
    return out


def _decided_by(index: RuleIndex, rule: Rule, name: str, port: int) -> bool:
    """Whether the policy ``index`` is of decides ``name`` on ``port`` by ``rule``."""
    found = index.match_name(name, port)
    return found.deny is None and found.allow is rule


def _net_by(index: RuleIndex, rule: Rule, port: int, net: IPNetwork) -> bool:
    """:func:`_decided_by` for the first address of ``net``."""
    found = index.match_value(net.version, int(net.network_address), port)
    return found.deny is None and found.allow is rule


def _rule_problems(rule: Rule, managed: Managed, local: RuleIndex) -> list[Problem]:
    out: list[Problem] = []
    for gap in rule_gaps(rule, managed, local):
        message = gap.why or f"no rule of the managed policy {managed.path} allows {gap.where}"
        out.append(
            Problem(
                rule.file,
                rule.line,
                rule.name,
                gap.key,
                f"{gap.where} is outside the managed ceiling: {message}",
            )
        )
    return out


def effective(local: Policy, managed: Managed) -> Policy:
    """The policy the gate enforces: local rules plus the managed deny rules, a version covering
    both layers, both layers' files (all watched for reloads), and the ceiling report mode obeys."""
    digest = hashlib.sha256(f"{managed.policy.version}\n{local.version}".encode()).hexdigest()
    return Policy(
        version=digest[:16],
        mode=local.mode,
        rules=(*local.rules, *managed.denies),
        allow_internal=local.allow_internal,
        files=(*local.files, *managed.policy.files),
        named=(*local.named, *managed.policy.named),
        ceiling=managed.policy,
    )


def load_with_ceiling(
    path: str | os.PathLike[str], managed_path: str | os.PathLike[str] | None
) -> Policy:
    """The local policy, checked against and combined with the managed one (when given); raises
    PolicyError naming every problem in either. The managed file is read again each time: a reload
    re-checks the ceiling as it is now."""
    if managed_path is None:
        return load_policy(path)
    managed = load_managed(managed_path)
    try:
        local = load_policy(path)
    except OSError as exc:
        shown = str(path)
        raise PolicyError(
            [Problem(shown, None, None, None, f"cannot read: {exc.strerror or exc}")], shown
        ) from None
    problems = ceiling_problems(local, managed)
    if problems:
        raise PolicyError(problems, str(path))
    return effective(local, managed)


def load_effective(
    path: str | os.PathLike[str] | None, managed_path: str | os.PathLike[str] | None
) -> Policy:
    """:func:`load_with_ceiling` for a command: the shipped default preset when no local file is
    given (it must fit under the ceiling too), and every failure as a PolicyError."""
    from proxy.policy.loader import policy_file

    target = policy_file(path)
    try:
        return load_with_ceiling(target, managed_path)
    except OSError as exc:
        problem = Problem(str(target), None, None, None, f"cannot read: {exc.strerror or exc}")
        raise PolicyError([problem], str(target)) from None


def managed_lint(managed_path: str | os.PathLike[str], paths: Iterable[Path]) -> list[Problem]:
    """``egress lint --managed``: the managed file's own problems, then every local file's ways
    past the ceiling (each naming both files, lines and rules)."""
    try:
        managed = load_managed(managed_path)
    except PolicyError as exc:
        return list(exc.problems)
    problems: list[Problem] = []
    for path in paths:
        try:
            local = load_policy(path)
        except (PolicyError, OSError):
            continue  # lint_files has reported it
        problems += ceiling_problems(local, managed)
    return problems
