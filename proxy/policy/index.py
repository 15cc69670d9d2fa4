"""The compiled form of a policy's rules: lookups whose cost depends on the request, not the rule count.

Host patterns live in one dict keyed by their canonical base name. A lookup walks the suffixes of the
requested name (``a.b.example.com``, ``b.example.com``, ``example.com``, ``com``): one dict probe per
label, most specific first, so the first hit found is also the rule to report. CIDRs live in one dict of
masked network integers per (family, prefix length); a lookup probes only the prefix lengths that occur,
longest first. Neither path looks at a rule that cannot match, and no pattern is ever a regex.

Within one key several rules may apply; a ``_Slot`` answers "which rule covers this port" with one more
dict probe. Ties (same key) go to the rule loaded first.

Request rules (rules with request conditions, or ``inspect``) are found through the same host walk:
:meth:`RuleIndex.request_rules` collects every rule covering a host and port into a short
:class:`RequestRules` (cached per host and port), or None when no rule there reads requests. Deny rules
with request conditions refuse only the requests they match, so the host lookups above never see them.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.policy.model import Rule

ANY_PORT = None  # DNS questions: no port to check, any allow rule for the name answers


class _Slot:
    """The rules of one action that share one key (a pattern, or a network)."""

    __slots__ = ("any_port", "by_port", "first")

    def __init__(self) -> None:
        self.first: Rule | None = None
        self.any_port: Rule | None = None
        self.by_port: dict[int, Rule] = {}

    def add(self, rule: Rule) -> None:
        if self.first is None:
            self.first = rule
        if rule.ports is None:
            if self.any_port is None:
                self.any_port = rule
            return
        for port in rule.ports:
            self.by_port.setdefault(port, rule)

    def allowing(self, port: int | None) -> Rule | None:
        """The allow rule covering ``port``; ``None`` (DNS) is covered by any rule."""
        if port is None:
            return self.first
        return self.by_port.get(port) or self.any_port

    def denying(self, port: int | None) -> Rule | None:
        """The deny rule covering ``port``; ``None`` (DNS) only by rules that deny every port.

        A deny rule for ``github.com`` port 22 must not stop the name resolving for port 443.
        """
        if port is None:
            return self.any_port
        return self.by_port.get(port) or self.any_port


class _NameNode:
    """Everything keyed by one canonical name: exact, ``*.`` and ``**.`` slots for deny and allow."""

    __slots__ = ("exact_allow", "exact_deny", "sub_allow", "sub_deny", "tree_allow", "tree_deny")

    def __init__(self) -> None:
        self.exact_deny: _Slot | None = None
        self.exact_allow: _Slot | None = None
        self.sub_deny: _Slot | None = None
        self.sub_allow: _Slot | None = None
        self.tree_deny: _Slot | None = None
        self.tree_allow: _Slot | None = None


class _NetNode:
    __slots__ = ("allow", "deny")

    def __init__(self) -> None:
        self.deny: _Slot | None = None
        self.allow: _Slot | None = None


class Match:
    """The outcome of one lookup; ``deny`` wins, then ``allow``, then ``nearest`` explains a port miss."""

    __slots__ = ("allow", "deny", "nearest")

    def __init__(self, deny: Rule | None, allow: Rule | None, nearest: Rule | None) -> None:
        self.deny = deny
        self.allow = allow
        self.nearest = nearest  # most specific allow rule matching the host on any port


class RequestRules:
    """The rules that decide requests to one host and port: conditional deny rules, then every allow
    rule (with or without conditions), each in policy order. ``judged`` caches the request step's
    answers for request heads seen before (see :func:`proxy.core.requests.judge`)."""

    __slots__ = ("allow", "deny", "judged")

    def __init__(self, deny: tuple[Rule, ...], allow: tuple[Rule, ...]) -> None:
        self.deny = deny
        self.allow = allow
        self.judged: dict[object, object] = {}


_MAX_CACHED = 8192
_NO_RULES = RequestRules((), ())  # cached "nothing here reads requests"


class RuleIndex:
    """Built once per policy; every lookup is read-only, so one index serves all threads (the
    engine's memo beside them, :attr:`outcomes`, is a dict of a pure function's answers: a race
    at worst computes one twice)."""

    __slots__ = ("_by_name", "_cache", "_names", "_nets4", "_nets6", "outcomes", "size")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._names: dict[str, _NameNode] = {}
        # proxy.core.engine's memo of this policy's outcomes (a Policy builds its own index, so the
        # policy's mode and ceiling are fixed for it too).
        self.outcomes: dict[tuple[object, ...], Any] = {}
        nets: dict[tuple[int, int, int], _NetNode] = {}  # (version, prefixlen, network int)
        self.size = 0
        ordered = list(rules)
        # Only a policy with request rules pays for the per-name lists they are looked up in.
        reads = any(rule.reads_requests for rule in ordered)
        self._by_name: dict[str, list[tuple[str, int, Rule]]] | None = {} if reads else None
        self._cache: dict[tuple[str, int], RequestRules] = {}
        for order, rule in enumerate(ordered):
            self.size += 1
            deny = rule.action == "deny"
            if self._by_name is not None:
                for pattern in rule.hosts:
                    entry = (str(pattern.kind), order, rule)
                    self._by_name.setdefault(pattern.base, []).append(entry)
            # A deny rule with request conditions refuses matching requests only, never a whole host.
            for pattern in () if deny and rule.request is not None else rule.hosts:
                node = self._names.get(pattern.base)
                if node is None:
                    node = self._names[pattern.base] = _NameNode()
                attr = f"{pattern.kind}_{'deny' if deny else 'allow'}"
                slot: _Slot | None = getattr(node, attr)
                if slot is None:
                    slot = _Slot()
                    setattr(node, attr, slot)
                slot.add(rule)
            for net in rule.cidrs:
                key = (net.version, net.prefixlen, int(net.network_address))
                netnode = nets.get(key)
                if netnode is None:
                    netnode = nets[key] = _NetNode()
                if deny:
                    netnode.deny = netnode.deny or _Slot()
                    netnode.deny.add(rule)
                else:
                    netnode.allow = netnode.allow or _Slot()
                    netnode.allow.add(rule)
        self._nets4 = _levels(nets, 4, 32)
        self._nets6 = _levels(nets, 6, 128)

    def match_name(self, name: str, port: int | None) -> Match:
        """Rules for a canonical host name; walks its suffixes, most specific first."""
        names = self._names
        deny = allow = nearest = None
        node = names.get(name)
        if node is not None:
            # The name itself: exact patterns first, then ``**.name`` (which includes its apex).
            for dslot in (node.exact_deny, node.tree_deny):
                if dslot is not None and deny is None:
                    deny = dslot.denying(port)
            if deny is not None:
                return Match(deny, None, None)
            for aslot in (node.exact_allow, node.tree_allow):
                if aslot is not None:
                    if nearest is None:
                        nearest = aslot.first
                    if allow is None:
                        allow = aslot.allowing(port)
        dot = name.find(".")
        while dot >= 0:
            suffix = name[dot + 1 :]
            dot = name.find(".", dot + 1)
            node = names.get(suffix)
            if node is None:
                continue
            for dslot in (node.sub_deny, node.tree_deny):
                if dslot is not None:
                    deny = dslot.denying(port)
                    if deny is not None:
                        return Match(deny, None, None)
            if allow is None:
                for aslot in (node.sub_allow, node.tree_allow):
                    if aslot is not None:
                        if nearest is None:
                            nearest = aslot.first
                        if allow is None:
                            allow = aslot.allowing(port)
        return Match(None, allow, nearest)

    def request_rules(self, name: str, port: int) -> RequestRules | None:
        """The rules deciding requests to a canonical host name and port, or None when no rule there
        reads requests (the host is then decided as a whole, and its TLS is not terminated)."""
        if self._by_name is None:
            return None
        key = (name, port)
        found = self._cache.get(key)
        if found is None:
            found = self._collect(name, port)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[key] = found
        return None if found is _NO_RULES else found

    def _collect(self, name: str, port: int) -> RequestRules:
        assert self._by_name is not None
        hits: list[tuple[int, Rule]] = []
        for kind, order, rule in self._by_name.get(name, ()):
            if kind != "sub":
                hits.append((order, rule))
        dot = name.find(".")
        while dot >= 0:
            for kind, order, rule in self._by_name.get(name[dot + 1 :], ()):
                if kind != "exact":
                    hits.append((order, rule))
            dot = name.find(".", dot + 1)
        covering = [
            rule
            for _, rule in sorted(dict(hits).items())
            if rule.ports is None or port in rule.ports
        ]
        # SSH (port 22) cannot be read: only a rule naming port 22 itself (refused at load) reads it.
        if not any(r.reads_requests and (port != 22 or r.ports) for r in covering):
            return _NO_RULES
        deny = tuple(r for r in covering if r.action == "deny" and r.request is not None)
        allow = tuple(r for r in covering if r.action != "deny")
        return RequestRules(deny, allow)

    def match_address(self, address: IPv4Address | IPv6Address, port: int | None) -> Match:
        """Rules for an IP literal; only CIDR rules can match, longest prefix first."""
        return self.match_value(address.version, int(address), port)

    def match_value(self, version: int, value: int, port: int | None) -> Match:
        """:meth:`match_address` for an address given as its IP version and integer value."""
        levels = self._nets4 if version == 4 else self._nets6
        allow = nearest = None
        for mask, table in levels:
            node = table.get(value & mask)
            if node is None:
                continue
            if node.deny is not None:
                deny = node.deny.denying(port)
                if deny is not None:
                    return Match(deny, None, None)
            if node.allow is not None and allow is None:
                if nearest is None:
                    nearest = node.allow.first
                allow = node.allow.allowing(port)
        return Match(None, allow, nearest)


def _levels(
    nets: dict[tuple[int, int, int], _NetNode], version: int, bits: int
) -> tuple[tuple[int, dict[int, _NetNode]], ...]:
    """(mask, {network int: node}) for each prefix length present, longest prefix first."""
    tables: dict[int, dict[int, _NetNode]] = {}
    for (v, prefixlen, network), node in nets.items():
        if v == version:
            tables.setdefault(prefixlen, {})[network] = node
    full = (1 << bits) - 1
    return tuple(
        (full ^ ((1 << (bits - plen)) - 1), tables[plen]) for plen in sorted(tables, reverse=True)
    )
