"""``egress policy diff OLD NEW``: what a policy change opens and closes, for review.

"Opens" is everything NEW allows that OLD did not; "closes" the reverse. Both are computed with the
same coverage check as the managed ceiling (:func:`proxy.policy.managed.rule_gaps`), one policy taken
as the other's ceiling: a host pattern, network, port or request condition of an allow or ask rule not
covered by the other side. Deny rules, the mode and ``allow_internal`` are compared on their own (a
removed deny rule opens, an added one closes; report mode opens). Each line names the rule and its
file and line.
"""

from __future__ import annotations

import dataclasses

from proxy.policy.managed import Managed, rule_gaps
from proxy.policy.model import Action, Mode, Policy, Rule


def _side(policy: Policy) -> Managed:
    return Managed(policy, "", frozenset())


def _where(rule: Rule) -> str:
    return f"rule '{rule.name}' ({rule.file}:{rule.line})"


def _describe(rule: Rule) -> str:
    what = [str(h) for h in rule.hosts] + [str(c) for c in rule.cidrs]
    return f"{', '.join(what)} on {rule.ports_text()}"


def _requests(rule: Rule) -> str:
    c = rule.request
    if c is None:
        return ""
    parts = []
    if c.methods is not None:
        parts.append(f"methods {sorted(c.methods)}")
    if c.paths is not None:
        parts.append(f"paths {[g.text for g in c.paths]}")
    return f" ({'; '.join(parts)})" if parts else " (request conditions)"


def diff_policies(old: Policy, new: Policy) -> list[str]:
    lines: list[str] = []
    for label, src, dst in (("opens", new, old), ("closes", old, new)):
        ceiling = _side(dst)
        for rule in src.rules:
            if rule.action is Action.DENY:
                continue
            for gap in rule_gaps(rule, ceiling):
                verb = "asks for" if rule.action is Action.ASK else "allows"
                why = f" [{gap.why}]" if gap.why else ""
                lines.append(
                    f"{label}: {gap.where}{_requests(rule)}: {_where(rule)} {verb} it{why}"
                )
    old_denies = {
        r.name: dataclasses.replace(r, file="", line=0)
        for r in old.rules
        if r.action is Action.DENY
    }
    new_denies = {
        r.name: dataclasses.replace(r, file="", line=0)
        for r in new.rules
        if r.action is Action.DENY
    }
    by_name = {r.name: r for r in (*old.rules, *new.rules)}
    for name in sorted(old_denies.keys() - new_denies.keys()):
        lines.append(f"opens: deny {_where(by_name[name])} removed: {_describe(old_denies[name])}")
    for name in sorted(new_denies.keys() - old_denies.keys()):
        lines.append(f"closes: deny {_where(by_name[name])} added: {_describe(new_denies[name])}")
    for name in sorted(old_denies.keys() & new_denies.keys()):
        if old_denies[name] != new_denies[name]:
            lines.append(
                f"changes: deny rule '{name}': {_describe(old_denies[name])} -> "
                f"{_describe(new_denies[name])}"
            )
    if old.mode is not new.mode:
        verb = "opens" if new.mode is Mode.REPORT else "closes"
        lines.append(f"{verb}: mode {old.mode} -> {new.mode}")
    for net in new.allow_internal:
        if not any(net.version == o.version and net.subnet_of(o) for o in old.allow_internal):  # type: ignore[arg-type]
            lines.append(f"opens: allow_internal {net}")
    for net in old.allow_internal:
        if not any(net.version == n.version and net.subnet_of(n) for n in new.allow_internal):  # type: ignore[arg-type]
            lines.append(f"closes: allow_internal {net}")
    return lines
