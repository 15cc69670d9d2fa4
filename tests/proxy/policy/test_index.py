"""The compiled index: suffix walks, specificity, CIDR longest prefix, cost independent of size."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import pytest

from proxy.policy.index import RuleIndex
from proxy.policy.model import Action, HostPattern, PatternKind, Rule

EXACT, SUB, TREE = PatternKind.EXACT, PatternKind.SUB, PatternKind.TREE


def host_rule(name: str, *patterns: str, action: Action = Action.ALLOW, ports: Any = "443") -> Rule:
    parsed = []
    for p in patterns:
        if p.startswith("**."):
            parsed.append(HostPattern(TREE, p[3:]))
        elif p.startswith("*."):
            parsed.append(HostPattern(SUB, p[2:]))
        else:
            parsed.append(HostPattern(EXACT, p))
    port_set = None if ports is None else frozenset(int(x) for x in ports.split(","))
    return Rule(name, action, hosts=tuple(parsed), ports=port_set)


def net_rule(name: str, *nets: str, action: Action = Action.ALLOW, ports: Any = "443") -> Rule:
    port_set = None if ports is None else frozenset(int(x) for x in ports.split(","))
    return Rule(name, action, cidrs=tuple(ip_network(n) for n in nets), ports=port_set)


RULES = [
    host_rule("exact", "a.example.com"),
    host_rule("sub", "*.example.com"),
    host_rule("tree", "**.example.com", ports="443,8443"),
    host_rule("deep", "*.b.a.example.com"),
    host_rule("twin-1", "twin.example.net"),
    host_rule("twin-2", "twin.example.net", ports="8080"),
    host_rule("any-deny", "**.bad.example.com", action=Action.DENY, ports=None),
    host_rule("ssh-deny", "a.example.com", action=Action.DENY, ports="22"),
    host_rule("sub-deny", "*.nope.example.com", action=Action.DENY, ports=None),
]


@pytest.fixture(scope="module")
def index() -> RuleIndex:
    return RuleIndex(RULES)


NAME_CASES = [
    # name, port, deny, allow, nearest
    ("a.example.com", 443, None, "exact", "exact"),
    ("a.example.com", 8443, None, "tree", "exact"),
    ("a.example.com", 22, "ssh-deny", None, None),
    ("a.example.com", 80, None, None, "exact"),
    ("example.com", 443, None, "tree", "tree"),  # `*.` does not cover the apex, `**.` does
    ("x.example.com", 443, None, "sub", "sub"),  # same base: `*.` listed before `**.`
    ("x.example.com", 8443, None, "tree", "sub"),
    ("c.b.a.example.com", 443, None, "deep", "deep"),
    ("z.y.c.b.a.example.com", 443, None, "deep", "deep"),
    ("b.a.example.com", 443, None, "sub", "sub"),
    ("twin.example.net", 443, None, "twin-1", "twin-1"),
    ("twin.example.net", 8080, None, "twin-2", "twin-1"),
    ("bad.example.com", 443, "any-deny", None, None),
    ("x.bad.example.com", 1, "any-deny", None, None),
    ("nope.example.com", 443, None, "sub", "sub"),  # a `*.` deny does not cover its apex either
    ("x.nope.example.com", 443, "sub-deny", None, None),
    ("example.com.evil.net", 443, None, None, None),
    ("evilexample.com", 443, None, None, None),
    ("com", 443, None, None, None),
    # DNS (port None): allow on any port; deny only by every-port rules
    ("a.example.com", None, None, "exact", "exact"),
    ("twin.example.net", None, None, "twin-1", "twin-1"),
    ("x.bad.example.com", None, "any-deny", None, None),
]


@pytest.mark.parametrize(("name", "port", "deny", "allow", "nearest"), NAME_CASES)
def test_match_name(
    index: RuleIndex,
    name: str,
    port: int | None,
    deny: str | None,
    allow: str | None,
    nearest: str | None,
) -> None:
    match = index.match_name(name, port)
    got = tuple(r.name if r else None for r in (match.deny, match.allow, match.nearest))
    assert got == (deny, allow, nearest)


NETS = [
    net_rule("wide", "198.51.100.0/24"),
    net_rule("narrow", "198.51.100.128/25", ports="8443"),
    net_rule("host", "198.51.100.7/32", ports="9000"),
    net_rule("deny-ssh", "198.51.100.0/24", action=Action.DENY, ports="22"),
    net_rule("v6", "2001:db8::/32"),
    net_rule("v6-deny", "2001:db8:dead::/48", action=Action.DENY, ports=None),
    net_rule("everything-v4", "0.0.0.0/0", ports="7"),
]

NET_CASES = [
    ("198.51.100.7", 443, None, "wide", "host"),
    ("198.51.100.7", 9000, None, "host", "host"),
    ("198.51.100.200", 8443, None, "narrow", "narrow"),
    ("198.51.100.200", 443, None, "wide", "narrow"),
    ("198.51.100.200", 22, "deny-ssh", None, None),
    ("198.51.101.1", 443, None, None, "everything-v4"),
    ("8.8.8.8", 7, None, "everything-v4", "everything-v4"),
    ("2001:db8::1", 443, None, "v6", "v6"),
    ("2001:db8:dead::1", 443, "v6-deny", None, None),
    ("2001:db9::1", 443, None, None, None),
    ("::ffff:c633:6407", 443, None, None, None),  # v6 never matches v4 tables (hosts.py maps it)
]


@pytest.mark.parametrize(("address", "port", "deny", "allow", "nearest"), NET_CASES)
def test_match_address(
    address: str, port: int | None, deny: str | None, allow: str | None, nearest: str | None
) -> None:
    match = RuleIndex(NETS).match_address(ip_address(address), port)
    got = tuple(r.name if r else None for r in (match.deny, match.allow, match.nearest))
    assert got == (deny, allow, nearest)


def test_names_and_addresses_are_separate() -> None:
    index = RuleIndex([host_rule("n", "**.example.com"), net_rule("a", "10.0.0.0/8")])
    assert index.match_address(IPv4Address("10.1.2.3"), 443).allow is not None
    assert index.match_name("10.1.2.3", 443).allow is None
    assert index.match_address(IPv6Address("::1"), 443).nearest is None


class CountingDict(dict[Any, Any]):
    probes = 0

    def get(self, key: Any, default: Any = None) -> Any:
        CountingDict.probes += 1
        return super().get(key, default)


@pytest.mark.parametrize("size", [10, 20_000])
def test_name_lookup_costs_one_probe_per_label(size: int) -> None:
    rules = [host_rule(f"r{i}", f"h{i}.example.com", f"*.s{i}.example.org") for i in range(size)]
    index = RuleIndex(rules)
    index._names = CountingDict(index._names)
    for name, labels in (("x.y.s5.example.org", 5), ("h3.example.com", 3), ("nothing", 1)):
        CountingDict.probes = 0
        index.match_name(name, 443)
        assert CountingDict.probes == labels


def test_address_lookup_probes_only_present_prefix_lengths() -> None:
    rules = [net_rule(f"n{i}", f"10.{i // 256}.{i % 256}.0/24") for i in range(5000)]
    rules.append(net_rule("one", "192.0.2.1/32"))
    index = RuleIndex(rules)
    levels = index._nets4
    assert [bin(mask).count("1") for mask, _ in levels] == [32, 24]
    counting = tuple((mask, CountingDict(table)) for mask, table in levels)
    index._nets4 = counting
    CountingDict.probes = 0
    assert index.match_address(IPv4Address("10.3.4.5"), 443).allow is rules[3 * 256 + 4]
    assert CountingDict.probes == 2


# -- request rules --------------------------------------------------------------------------------


def _reading(rule: Rule, **conditions: Any) -> Rule:
    from dataclasses import replace

    from proxy.policy.model import RequestConditions

    return replace(rule, request=RequestConditions(**conditions))


def test_request_rules_collect_every_level_in_policy_order() -> None:
    wide = host_rule("wide", "**.example.com")  # no conditions: allows any request
    reads = _reading(host_rule("reads", "api.example.com"), methods=frozenset({"GET"}))
    sub = _reading(host_rule("sub-reads", "*.example.com"), methods=frozenset({"HEAD"}))
    no_post = _reading(
        host_rule("no-post", "**.example.com", action=Action.DENY, ports=None),
        methods=frozenset({"POST"}),
    )
    other_port = _reading(host_rule("other-port", "api.example.com", ports="8443"))
    index = RuleIndex([wide, reads, sub, no_post, other_port])
    found = index.request_rules("api.example.com", 443)
    assert found is not None
    assert [r.name for r in found.deny] == ["no-post"]
    assert [r.name for r in found.allow] == ["wide", "reads", "sub-reads"]
    assert index.request_rules("api.example.com", 443) is found  # cached
    # the apex: only the ``**.`` rules cover it, and one of them (the deny) reads requests
    apex = index.request_rules("example.com", 443)
    assert apex is not None and [r.name for r in apex.allow] == ["wide"]
    assert index.request_rules("unrelated.org", 443) is None


def test_a_deny_rule_with_conditions_never_denies_a_host() -> None:
    no_post = _reading(
        host_rule("no-post", "api.example.com", action=Action.DENY, ports=None),
        methods=frozenset({"POST"}),
    )
    index = RuleIndex([host_rule("api", "api.example.com"), no_post])
    match = index.match_name("api.example.com", 443)
    assert match.deny is None and match.allow is not None and match.allow.name == "api"
    assert index.match_name("api.example.com", None).deny is None  # DNS too


def test_ssh_is_never_read_by_a_rule_for_every_port() -> None:
    no_post = _reading(
        host_rule("no-post", "github.com", action=Action.DENY, ports=None),
        methods=frozenset({"POST"}),
    )
    index = RuleIndex([host_rule("gh", "github.com", ports="22,443"), no_post])
    assert index.request_rules("github.com", 443) is not None
    assert index.request_rules("github.com", 22) is None


def test_policies_without_request_rules_build_no_request_lists() -> None:
    index = RuleIndex(RULES)
    assert index.request_rules("a.example.com", 443) is None
    assert index._by_name is None
