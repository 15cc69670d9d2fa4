"""The policy model: host pattern parsing, public-suffix checks, problem rendering."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from proxy.policy.model import (
    UNLISTED_PUBLIC_SUFFIXES,
    Action,
    HostPattern,
    Mode,
    PatternKind,
    Policy,
    PolicyError,
    Problem,
    Rule,
    is_public_suffix,
    parse_host_pattern,
)

EXACT, SUB, TREE = PatternKind.EXACT, PatternKind.SUB, PatternKind.TREE

VALID = [
    ("example.com", EXACT, "example.com"),
    ("Example.COM.", EXACT, "example.com"),
    ("  pypi.org  ", EXACT, "pypi.org"),
    ("*.example.com", SUB, "example.com"),
    ("**.example.com", TREE, "example.com"),
    ("**.EXAMPLE.com.", TREE, "example.com"),
    ("*.a.b.example.co.uk", SUB, "a.b.example.co.uk"),
    ("**.example.co.uk", TREE, "example.co.uk"),
    ("*.user.github.io", SUB, "user.github.io"),
    ("bücher.example", EXACT, "xn--bcher-kva.example"),
    ("*.münchen.example.com", SUB, "xn--mnchen-3ya.example.com"),
    ("com", EXACT, "com"),  # an exact TLD is narrow: only that name
    ("_acme-challenge.example.com", EXACT, "_acme-challenge.example.com"),
]


@pytest.mark.parametrize(("text", "kind", "base"), VALID)
def test_valid_patterns(text: str, kind: PatternKind, base: str) -> None:
    assert parse_host_pattern(text) == HostPattern(kind, base)


INVALID = [
    ("*", "matches every host"),
    ("**", "matches every host"),
    ("*.", "matches every host"),
    ("*.com", "public suffix 'com'"),
    ("**.com", "public suffix 'com'"),
    ("*.co.uk", "public suffix 'co.uk'"),
    ("**.co.uk", "public suffix 'co.uk'"),
    ("*.github.io", "public suffix 'github.io'"),
    ("*.s3.amazonaws.com", "public suffix 's3.amazonaws.com'"),
    ("*.internal", "public suffix 'internal'"),
    ("**.pages.dev", "public suffix 'pages.dev'"),  # unknown TLDs count as public suffixes
    ("*.xn--p1ai", "public suffix 'xn--p1ai'"),
    ("*.рф", "public suffix 'xn--p1ai'"),
    ("a*.b.com", "only allowed as a whole leading label"),
    ("foo.*.com", "only allowed as a whole leading label"),
    ("*foo.com", "only allowed as a whole leading label"),
    ("***.foo.com", "only allowed as a whole leading label"),
    ("*.*.foo.com", "only allowed as a whole leading label"),
    ("example.*", "only allowed as a whole leading label"),
    ("10.0.0.1", "is an IP address"),
    ("2852039166", "is an IP address"),
    ("[::1]", "is an IP address"),
    ("::1", "is an IP address"),
    ("*.10.0.0.1", "is an IP address"),
    ("**.127.1", "is an IP address"),
    ("", "not a valid host name"),
    ("a..b", "not a valid host name"),
    ("user@example.com", "not a valid host name"),
    ("exa mple.com", "not a valid host name"),
    ("example.com/path", "not a valid host name"),
    ("x" * 64 + ".com", "not a valid host name"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_patterns(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="") as info:
        parse_host_pattern(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("name", "public"),
    [
        ("com", True),
        ("co.uk", True),
        ("github.io", True),
        ("example", True),
        ("example.com", False),
        ("pypi.org", False),
        ("pythonhosted.org", False),
        ("user.github.io", False),
        ("archive.ubuntu.com", False),
        ("pages.dev", True),
        ("vercel.app", True),
        ("project.pages.dev", False),
        ("xn--fiqs8s", True),  # a TLD in punycode, as hosts are canonicalised
        ("internal", True),  # unknown TLD
    ],
)
def test_public_suffix(name: str, public: bool) -> None:
    assert is_public_suffix(name) is public


# Shared-hosting suffixes a wildcard must never cover; the first list of them had to be kept by hand.
SHARED_HOSTING = [
    "codeberg.page", "deno.dev", "fly.dev", "hf.space", "loca.lt", "netlify.app", "ngrok-free.app",
    "ngrok-free.dev", "ngrok.app", "ngrok.dev", "pages.dev", "r2.dev", "replit.app", "replit.dev",
    "streamlit.app", "surge.sh", "up.railway.app", "vercel.app",
]  # fmt: skip


@pytest.mark.parametrize("suffix", SHARED_HOSTING)
@pytest.mark.parametrize("wildcard", ["*.", "**."])
def test_wildcards_over_shared_hosting_suffixes_are_refused(suffix: str, wildcard: str) -> None:
    with pytest.raises(ValueError, match="public suffix") as info:
        parse_host_pattern(wildcard + suffix)
    assert repr(suffix) in str(info.value)
    # one site's own names stay expressible (two labels down: replit.dev's list entry is *.replit.dev)
    assert parse_host_pattern(f"{wildcard}www.site.{suffix}").base == f"www.site.{suffix}"


def test_the_unlisted_suffixes_are_only_those_the_maintained_list_lacks() -> None:
    """When the Public Suffix List gains one of them, its entry here is dead weight: remove it."""
    from publicsuffixlist import PublicSuffixList

    psl = PublicSuffixList()
    assert [name for name in sorted(UNLISTED_PUBLIC_SUFFIXES) if psl.is_public(name)] == []


def test_pattern_str_round_trips() -> None:
    for text in ("example.com", "*.example.com", "**.example.com"):
        assert str(parse_host_pattern(text)) == text


@pytest.mark.parametrize(
    ("problem", "text"),
    [
        (
            Problem("allowlists/x.yaml", 12, "pypi", "ports", "70000 is not a port (1-65535)"),
            "allowlists/x.yaml:12: rule 'pypi': key 'ports': 70000 is not a port (1-65535)",
        ),
        (Problem("x.yaml", 3, None, "mode", "bad"), "x.yaml:3: key 'mode': bad"),
        (Problem("x.yaml", 3, "#2", "name", "missing"), "x.yaml:3: rule #2: key 'name': missing"),
        (Problem("x.yaml", 4, "r", None, "empty"), "x.yaml:4: rule 'r': empty"),
        (Problem("x.yaml", None, None, None, "empty file"), "x.yaml: empty file"),
    ],
)
def test_problem_rendering(problem: Problem, text: str) -> None:
    assert str(problem) == text


def test_policy_error_carries_every_problem() -> None:
    problems = [
        Problem("a.yaml", 1, None, "version", "one"),
        Problem("b.yaml", 2, "r", None, "two"),
    ]
    error = PolicyError(problems)
    assert error.problems == problems
    assert str(error) == "a.yaml:1: key 'version': one\nb.yaml:2: rule 'r': two"


def test_policy_error_lines_are_every_problem_then_the_verdict() -> None:
    problems = [
        Problem("a.yaml", 1, None, "version", "one"),
        Problem("b.yaml", 2, "r", None, "two"),
    ]
    assert PolicyError(problems, "a.yaml").lines() == [
        "a.yaml:1: key 'version': one",
        "b.yaml:2: rule 'r': two",
        "refusing to load a.yaml: 2 problem(s)",
    ]
    assert PolicyError(problems[:1]).lines()[-1] == "refusing to load the policy: 1 problem(s)"


def test_rule_ports_text() -> None:
    assert Rule("r", ports=frozenset({443, 80})).ports_text() == "ports 80, 443"
    assert Rule("r", ports=frozenset({443})).ports_text() == "port 443"
    assert Rule("r", Action.DENY, ports=None).ports_text() == "every port"


def test_policy_compiles_its_index() -> None:
    rule = Rule(
        "r",
        hosts=(HostPattern(EXACT, "example.com"),),
        cidrs=(ip_network("192.0.2.0/24"),),
    )
    policy = Policy("v", Mode.ENFORCE, (rule,))
    assert policy.index.size == 1
    assert policy.index.match_name("example.com", 443).allow is rule
    assert policy.index.match_name("example.com", 80).allow is None
