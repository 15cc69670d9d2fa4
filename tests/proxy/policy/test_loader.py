"""Policy files: strict schema, every problem located by file:line, includes, cycles, versions."""

from __future__ import annotations

import os
import textwrap
from ipaddress import ip_network
from pathlib import Path

import pytest

from proxy.policy.loader import lint_files, load_policy, load_policy_file, policy_file
from proxy.policy.model import Action, Mode, PolicyError, Problem


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems, "PolicyError without problems"
    assert lint_files([path]) == info.value.problems
    return info.value.problems


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Messages show paths relative to the working directory; run from tmp_path so they are short.
    monkeypatch.chdir(tmp_path)


# --- a valid file --------------------------------------------------------------------------------


def test_full_schema_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        mode: report
        description: everything
        allow_internal: [10.1.0.0/16, "fd00::/8"]
        rules:
          - name: pypi
            description: python
            hosts: [PyPI.org., files.pythonhosted.org, "*.Example.com", "**.example.org"]
            ports: [443, 8443]
          - name: cache
            action: allow
            comment: build cache
            cidrs: [203.0.113.0/24, 198.51.100.7, "2001:db8::/32"]
          - name: no-ssh
            action: deny
            hosts: [github.com]
            ports: [22]
          - name: evil
            action: deny
            hosts: ["**.evil.example"]
        """,
    )
    policy = load_policy(path)
    assert policy.mode is Mode.REPORT
    assert policy.allow_internal == (ip_network("10.1.0.0/16"), ip_network("fd00::/8"))
    assert [r.name for r in policy.rules] == ["pypi", "cache", "no-ssh", "evil"]
    pypi, cache, no_ssh, evil = policy.rules
    assert [str(h) for h in pypi.hosts] == [
        "pypi.org",
        "files.pythonhosted.org",
        "*.example.com",
        "**.example.org",
    ]
    assert pypi.ports == frozenset({443, 8443})
    assert pypi.description == "python"
    assert (pypi.file, pypi.line) == ("p.yaml", 6)
    assert cache.ports == frozenset({443})  # allow default
    assert cache.cidrs == (
        ip_network("203.0.113.0/24"),
        ip_network("198.51.100.7/32"),
        ip_network("2001:db8::/32"),
    )
    assert cache.description == "build cache"
    assert no_ssh.action is Action.DENY and no_ssh.ports == frozenset({22})
    assert evil.ports is None  # a deny rule without ports denies every port
    assert policy.files == (path.resolve(),)
    assert len(policy.version) == 16 and int(policy.version, 16) >= 0


def test_mode_defaults_to_enforce_and_rules_may_be_absent(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", "version: 1\n"))
    assert policy.mode is Mode.ENFORCE
    assert policy.rules == ()


def test_idn_pattern_is_stored_as_punycode(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        rules:
          - name: idn
            hosts: ["bücher.example", "*.münchen.example.com"]
        """,
    )
    assert [str(h) for h in load_policy(path).rules[0].hosts] == [
        "xn--bcher-kva.example",
        "*.xn--mnchen-3ya.example.com",
    ]


# --- every problem kind, located -----------------------------------------------------------------

RULE_PROBLEMS = [
    # (rule body lines, expected str(problem))
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    ports: [70000]\n",
        "p.yaml:5: rule 'pypi': key 'ports': 70000 is not a port (1-65535)",
    ),
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    ports: [0]\n",
        "p.yaml:5: rule 'pypi': key 'ports': 0 is not a port (1-65535)",
    ),
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    ports: ['443']\n",
        "p.yaml:5: rule 'pypi': key 'ports': expected an integer, got a string ('443')",
    ),
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    ports: [yes]\n",
        "p.yaml:5: rule 'pypi': key 'ports': expected an integer, got a boolean ('yes')",
    ),
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    ports: 443\n",
        "p.yaml:5: rule 'pypi': key 'ports': expected a list, got an integer ('443')",
    ),
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    ports: []\n",
        "p.yaml:5: rule 'pypi': key 'ports': empty list matches nothing; list ports or leave the "
        "key out",
    ),
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    prots: [443]\n",
        "p.yaml:5: rule 'pypi': key 'prots': unknown key (expected one of: action, cidrs, comment, "
        "description, executables, graphql_operations, hosts, inspect, json_body, max_request_bytes, methods, mode, "
        "name, paths, paths_case, ports, query, review, timeout, websocket)",
    ),
    (
        "  - name: pypi\n    hosts: [pypi.org]\n    hosts: [evil.com]\n",
        "p.yaml:5: rule 'pypi': key 'hosts': duplicate key (first set on line 4)",
    ),
    (
        "  - name: pypi\n    action: permit\n    hosts: [pypi.org]\n",
        "p.yaml:4: rule 'pypi': key 'action': 'permit' is not allow, deny or ask",
    ),
    (
        "  - name: pypi\n    hosts: pypi.org\n",
        "p.yaml:4: rule 'pypi': key 'hosts': expected a list, got a string ('pypi.org')",
    ),
    (
        "  - name: pypi\n    hosts: [42]\n",
        "p.yaml:4: rule 'pypi': key 'hosts': expected a string, got an integer ('42')",
    ),
    (
        "  - name: wide\n    hosts: ['*']\n",
        "p.yaml:4: rule 'wide': key 'hosts': '*' matches every host; list the hosts instead",
    ),
    (
        "  - name: wide\n    hosts: ['**']\n",
        "p.yaml:4: rule 'wide': key 'hosts': '**' matches every host; list the hosts instead",
    ),
    (
        "  - name: wide\n    hosts: ['*.com']\n",
        "p.yaml:4: rule 'wide': key 'hosts': '*.com' would match every site under the public "
        "suffix 'com'; list the sites instead",
    ),
    (
        "  - name: wide\n    hosts: ['**.co.uk']\n",
        "p.yaml:4: rule 'wide': key 'hosts': '**.co.uk' would match every site under the public "
        "suffix 'co.uk'; list the sites instead",
    ),
    (
        "  - name: wide\n    hosts: ['*.github.io']\n",
        "p.yaml:4: rule 'wide': key 'hosts': '*.github.io' would match every site under the "
        "public suffix 'github.io'; list the sites instead",
    ),
    (
        "  - name: mid\n    hosts: ['a*.b.com']\n",
        "p.yaml:4: rule 'mid': key 'hosts': 'a*.b.com': '*' is only allowed as a whole leading "
        "label ('*.example.com' or '**.example.com')",
    ),
    (
        "  - name: mid\n    hosts: ['foo.*.com']\n",
        "p.yaml:4: rule 'mid': key 'hosts': 'foo.*.com': '*' is only allowed as a whole leading "
        "label ('*.example.com' or '**.example.com')",
    ),
    (
        "  - name: ip\n    hosts: [10.0.0.1]\n",
        "p.yaml:4: rule 'ip': key 'hosts': '10.0.0.1' is an IP address; IP destinations are "
        "matched by 'cidrs' only",
    ),
    (
        "  - name: ip\n    hosts: ['*.10.0.0.1']\n",
        "p.yaml:4: rule 'ip': key 'hosts': '*.10.0.0.1' is an IP address; IP destinations are "
        "matched by 'cidrs' only",
    ),
    (
        "  - name: ip\n    hosts: ['[::1]']\n",
        "p.yaml:4: rule 'ip': key 'hosts': '[::1]' is an IP address; IP destinations are matched "
        "by 'cidrs' only",
    ),
    (
        "  - name: bad\n    hosts: ['exa mple.com']\n",
        "p.yaml:4: rule 'bad': key 'hosts': 'exa mple.com' is not a valid host name: ",
    ),
    (
        "  - name: bad\n    hosts: ['a..b.com']\n",
        "p.yaml:4: rule 'bad': key 'hosts': 'a..b.com' is not a valid host name: empty label",
    ),
    (
        "  - name: net\n    cidrs: [203.0.113.5/24]\n",
        "p.yaml:4: rule 'net': key 'cidrs': '203.0.113.5/24' has host bits set; did you mean "
        "'203.0.113.0/24'?",
    ),
    (
        "  - name: net\n    cidrs: [203.0.113.0/33]\n",
        "p.yaml:4: rule 'net': key 'cidrs': '203.0.113.0/33' is not a network (e.g. "
        "203.0.113.0/24)",
    ),
    (
        "  - name: net\n    cidrs: [example.com]\n",
        "p.yaml:4: rule 'net': key 'cidrs': 'example.com' is not a network (e.g. 203.0.113.0/24)",
    ),
    (
        "  - name: net\n    cidrs: ['::ffff:10.0.0.0/104']\n",
        "p.yaml:4: rule 'net': key 'cidrs': '::ffff:10.0.0.0/104' is IPv4-mapped IPv6 and never "
        "matches; write the IPv4 form",
    ),
    (
        "  - name: empty\n    ports: [443]\n",
        "p.yaml:3: rule 'empty': a rule needs 'hosts' or 'cidrs'",
    ),
    (
        "  - name: empty\n    hosts: []\n",
        "p.yaml:3: rule 'empty': a rule needs at least one entry in 'hosts' or 'cidrs'",
    ),
    (
        "  - hosts: [pypi.org]\n",
        "p.yaml:3: rule #1: key 'name': missing; every rule needs a unique name",
    ),
    (
        "  - name: 'bad name'\n    hosts: [pypi.org]\n",
        "p.yaml:3: rule #1: key 'name': 'bad name' is not a rule name (letters, digits, '.', '_', "
        "'-'; at most 64)",
    ),
    (
        "  - name: 7\n    hosts: [pypi.org]\n",
        "p.yaml:3: rule #1: key 'name': expected a string, got an integer ('7')",
    ),
    (
        "  - name: d\n    description: [x]\n    hosts: [pypi.org]\n",
        "p.yaml:4: rule 'd': key 'description': expected a string, got a list",
    ),
    (
        "  - pypi.org\n",
        "p.yaml:3: rule #1: expected a rule (a mapping), got a string ('pypi.org')",
    ),
]


@pytest.mark.parametrize(("body", "expected"), RULE_PROBLEMS)
def test_rule_problem_names_file_line_rule_and_key(
    tmp_path: Path, body: str, expected: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n" + body, encoding="utf-8")
    problems = problems_of(path)
    assert len(problems) == 1, [str(p) for p in problems]
    assert str(problems[0]).startswith(expected)


TOP_PROBLEMS = [
    ("version: 2\n", "p.yaml:1: key 'version': 2 is not supported (this gate reads version 1)"),
    ("version: '1'\n", "p.yaml:1: key 'version': expected an integer, got a string ('1')"),
    ("mode: enforce\n", "p.yaml:1: key 'version': missing; a policy starts with 'version: 1'"),
    (
        "version: 1\nmode: audit\n",
        "p.yaml:2: key 'mode': 'audit' is not a mode (enforce or report)",
    ),
    (
        "version: 1\nrule: []\n",
        "p.yaml:2: key 'rule': unknown key (expected one of: allow_internal, description, include, "
        "mode, rules, version)",
    ),
    ("version: 1\nversion: 1\n", "p.yaml:2: key 'version': duplicate key (first set on line 1)"),
    ("version: 1\nrules: {}\n", "p.yaml:2: key 'rules': expected a list, got a mapping"),
    ("version: 1\ninclude: pypi\n", "p.yaml:2: key 'include': expected a list, got a string"),
    (
        "version: 1\nallow_internal: [10.0.0.1/8]\n",
        "p.yaml:2: key 'allow_internal': '10.0.0.1/8' has host bits set; did you mean '10.0.0.0/8'?",
    ),
    ("- version: 1\n", "p.yaml:1: expected a policy file (a mapping), got a list"),
    ("", "p.yaml: empty file; a policy starts with 'version: 1'"),
    ("version: 1\nrules: [\n", "p.yaml:3: invalid YAML:"),
    ("version: 1\n---\nversion: 1\n", "p.yaml:2: invalid YAML:"),
    ("version: 1\n? [a]\n: b\n", "p.yaml:2: keys must be strings, got a list"),
    (
        "version: 1\nrules: !!python/object:os.system [x]\n",
        "p.yaml:2: key 'rules': expected a list, got a list tagged "
        "tag:yaml.org,2002:python/object:os.system",
    ),
]


@pytest.mark.parametrize(("text", "expected"), TOP_PROBLEMS)
def test_top_level_problem_is_located(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    problems = problems_of(path)
    assert len(problems) == 1, [str(p) for p in problems]
    assert str(problems[0]).startswith(expected)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\ndescription: \xff\n")
    (problem,) = problems_of(path)
    assert str(problem).startswith("p.yaml: not UTF-8 text")


def test_missing_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "absent.yaml")
    assert str(problem).startswith("absent.yaml: cannot read absent.yaml:")


def test_a_command_without_a_policy_runs_with_the_default_preset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EGRESS_PRESETS_DIR", str(tmp_path))
    write(tmp_path, "default.yaml", "version: 1\nrules:\n  - name: only\n    hosts: [a.test]\n")
    assert policy_file(None) == tmp_path / "default.yaml"
    assert policy_file("own.yaml") == Path("own.yaml")
    assert [r.name for r in load_policy_file(None).rules] == ["only"]


def test_load_policy_file_names_the_file_it_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy_file(missing)
    assert info.value.path == str(missing)
    *problems, verdict = info.value.lines()
    assert len(problems) == 1 and "cannot read" in problems[0]
    assert verdict == f"refusing to load {missing}: 1 problem(s)"


def test_duplicate_rule_names_across_files(tmp_path: Path) -> None:
    write(
        tmp_path,
        "other.yaml",
        """
        version: 1
        rules:
          - name: pypi
            hosts: [evil.example.com]
        """,
    )
    top = write(
        tmp_path,
        "top.yaml",
        """
        version: 1
        include: [other.yaml]
        rules:
          - name: pypi
            hosts: [pypi.org]
        """,
    )
    (problem,) = problems_of(top)
    assert str(problem) == (
        "other.yaml:3: rule 'pypi': key 'name': duplicate rule name (first defined at top.yaml:4)"
    )


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        mode: loud
        rules:
          - name: a
            hosts: ["*.com"]
            ports: [0, 443, 99999]
          - name: a
            cidrs: [10.0.0.1/8]
          - name: b
            hosts: [ok.example.com]
            colour: red
        """,
    )
    problems = problems_of(path)
    assert [(p.line, p.rule, p.key) for p in problems] == [
        (2, None, "mode"),
        (5, "a", "hosts"),
        (6, "a", "ports"),
        (6, "a", "ports"),
        (7, "a", "name"),
        (8, "a", "cidrs"),
        (11, "b", "colour"),
    ]


def test_lint_files_collects_across_files_and_deduplicates(tmp_path: Path) -> None:
    shared = write(tmp_path, "shared.yaml", "version: 1\nrules:\n  - name: s\n    hosts: ['*']\n")
    one = write(tmp_path, "one.yaml", "version: 1\ninclude: [shared.yaml]\nmode: nope\n")
    two = write(tmp_path, "two.yaml", "version: 1\ninclude: [shared.yaml]\n")
    good = write(tmp_path, "good.yaml", "version: 1\n")
    problems = lint_files([one, two, good])
    assert [str(p).split(": ")[0] for p in problems] == ["one.yaml:3", "shared.yaml:4"]
    assert lint_files([good]) == []
    assert lint_files([]) == []
    _ = shared


# --- includes ------------------------------------------------------------------------------------


def test_include_relative_path_and_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    presets = tmp_path / "presets"
    write(presets, "reg.yaml", "version: 1\nrules:\n  - name: reg\n    hosts: [reg.example.com]\n")
    monkeypatch.setenv("EGRESS_PRESETS_DIR", str(presets))
    write(
        tmp_path,
        "sub/extra.yaml",
        "version: 1\nallow_internal: [10.9.0.0/16]\n"
        "rules:\n  - name: extra\n    hosts: [extra.example.com]\n",
    )
    top = write(
        tmp_path,
        "top.yaml",
        """
        version: 1
        include: [reg, sub/extra.yaml]
        allow_internal: [10.8.0.0/16]
        rules:
          - name: own
            hosts: [own.example.com]
        """,
    )
    policy = load_policy(top)
    assert [r.name for r in policy.rules] == ["own", "reg", "extra"]
    assert policy.files == (
        top.resolve(),
        (presets / "reg.yaml").resolve(),
        (tmp_path / "sub/extra.yaml").resolve(),
    )
    assert policy.allow_internal == (ip_network("10.8.0.0/16"), ip_network("10.9.0.0/16"))


def test_relative_include_resolves_against_the_including_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a/b/leaf.yaml",
        "version: 1\nrules:\n  - name: leaf\n    hosts: [l.example.com]\n",
    )
    write(tmp_path, "a/mid.yaml", "version: 1\ninclude: [b/leaf.yaml]\n")
    top = write(tmp_path, "top.yaml", "version: 1\ninclude: [a/mid.yaml]\n")
    assert [r.name for r in load_policy(top).rules] == ["leaf"]


def test_unknown_preset_is_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGRESS_PRESETS_DIR", str(tmp_path / "none"))
    top = write(tmp_path, "top.yaml", "version: 1\ninclude:\n  - nosuchpreset\n")
    (problem,) = problems_of(top)
    assert str(problem).startswith("top.yaml:3: key 'include': unknown preset 'nosuchpreset'")


def test_missing_include_file_is_located(tmp_path: Path) -> None:
    top = write(tmp_path, "top.yaml", "version: 1\ninclude: [gone.yaml]\n")
    (problem,) = problems_of(top)
    assert str(problem).startswith("top.yaml:2: key 'include': cannot read gone.yaml:")


def test_include_cycle_names_the_chain(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\ninclude: [b.yaml]\n")
    write(tmp_path, "b.yaml", "version: 1\ninclude: [c.yaml]\n")
    write(tmp_path, "c.yaml", "version: 1\ninclude:\n  - a.yaml\n")
    (problem,) = problems_of(tmp_path / "a.yaml")
    assert str(problem) == (
        "c.yaml:3: key 'include': include cycle: a.yaml -> b.yaml -> c.yaml -> a.yaml"
    )


def test_self_include_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\ninclude: [./a.yaml]\n")
    (problem,) = problems_of(tmp_path / "a.yaml")
    assert "include cycle: a.yaml -> a.yaml" in str(problem)


def test_diamond_include_loads_the_shared_file_once(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "version: 1\nrules:\n  - name: base\n    hosts: [b.example.com]\n")
    write(tmp_path, "left.yaml", "version: 1\ninclude: [base.yaml]\n")
    write(tmp_path, "right.yaml", "version: 1\ninclude: [./base.yaml]\n")
    top = write(tmp_path, "top.yaml", "version: 1\ninclude: [left.yaml, right.yaml]\n")
    policy = load_policy(top)
    assert [r.name for r in policy.rules] == ["base"]
    assert [p.name for p in policy.files] == ["top.yaml", "left.yaml", "base.yaml", "right.yaml"]


def test_mode_may_only_be_set_at_top_level(tmp_path: Path) -> None:
    write(tmp_path, "inc.yaml", "version: 1\nmode: report\n")
    top = write(tmp_path, "top.yaml", "version: 1\ninclude: [inc.yaml]\n")
    (problem,) = problems_of(top)
    assert str(problem).startswith(
        "inc.yaml:2: key 'mode': an included file cannot change the mode"
    )
    # Repeating the top-level mode is harmless.
    write(tmp_path, "same.yaml", "version: 1\nmode: report\n")
    ok = write(tmp_path, "ok.yaml", "version: 1\nmode: report\ninclude: [same.yaml]\n")
    assert load_policy(ok).mode is Mode.REPORT


def test_problems_in_included_files_name_that_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "inc.yaml",
        "version: 1\nrules:\n  - name: x\n    hosts: [a.com]\n    ports: [-1]\n",
    )
    top = write(tmp_path, "top.yaml", "version: 1\ninclude: [inc.yaml]\n")
    (problem,) = problems_of(top)
    assert str(problem) == "inc.yaml:5: rule 'x': key 'ports': -1 is not a port (1-65535)"


def test_paths_outside_cwd_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "p.yaml", "version: 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (problem,) = problems_of(path)
    assert problem.file == str(path.resolve())


# --- version ---------------------------------------------------------------------------------------


POLICY = """
version: 1
include: [inc.yaml]
rules:
  - name: a
    hosts: [a.example.com]
"""
INCLUDED = "version: 1\nrules:\n  - name: b\n    hosts: [b.example.com]\n"


def test_version_is_stable_across_locations(tmp_path: Path) -> None:
    for where in ("one", "two/deeper"):
        write(tmp_path / where, "top.yaml", POLICY)
        write(tmp_path / where, "inc.yaml", INCLUDED)
    first = load_policy(tmp_path / "one/top.yaml").version
    second = load_policy(tmp_path / "two/deeper/top.yaml").version
    os.chdir(tmp_path / "two")
    third = load_policy(Path("deeper/top.yaml")).version
    assert first == second == third


def test_version_changes_with_any_loaded_file(tmp_path: Path) -> None:
    top = write(tmp_path, "top.yaml", POLICY)
    inc = write(tmp_path, "inc.yaml", INCLUDED)
    before = load_policy(top).version
    inc.write_text(INCLUDED + "    ports: [443, 8443]\n", encoding="utf-8")
    after_include = load_policy(top).version
    top.write_text(POLICY + "# a comment\n", encoding="utf-8")
    after_top = load_policy(top).version
    assert len({before, after_include, after_top}) == 3
    same_length = POLICY.replace("a.example.com", "z.example.com") + "# a comment\n"
    top.write_text(same_length, encoding="utf-8")
    assert load_policy(top).version not in {before, after_include, after_top}


# --- request conditions ---------------------------------------------------------------------------


def test_request_conditions_load_canonical(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        rules:
          - name: git
            hosts: [github.com]
            methods: [GET, HEAD]
            paths: ["/*/*/info/refs", "/myorg/**"]
            paths_case: insensitive
            query: {service: git-upload-pack, flavor: [a, b]}
          - name: lfs
            hosts: [github.com]
            methods: [POST]
            json_body: {operation: download}
            max_request_bytes: 65536
          - name: graphql
            hosts: [api.github.com]
            graphql_operations: [query]
            websocket: false
          - name: audit-only
            hosts: [example.com]
            inspect: true
          - name: no-gists
            action: deny
            hosts: [api.github.com]
            paths: [/gists]
          - name: plain
            hosts: [pypi.org]
        """,
    )
    git, lfs, graphql, audit, gists, plain = load_policy(path).rules
    assert git.request is not None and git.reads_requests
    assert git.request.methods == frozenset({"GET", "HEAD"})
    assert [str(g) for g in git.request.paths or ()] == ["/*/*/info/refs", "/myorg/**"]
    assert all(g.insensitive for g in git.request.paths or ())
    assert git.request.query == (
        ("service", frozenset({"git-upload-pack"})),
        ("flavor", frozenset({"a", "b"})),
    )
    assert lfs.request is not None and lfs.request.reads_body
    assert lfs.request.max_request_bytes == 65536
    assert lfs.request.json_body == (("operation", frozenset({"download"})),)
    assert graphql.request is not None
    assert graphql.request.graphql_operations == frozenset({"query"})
    assert graphql.request.websocket is False
    assert audit.request is None and audit.inspect and audit.reads_requests
    assert gists.ports is None and gists.request is not None
    assert plain.request is None and not plain.reads_requests


REQUEST_PROBLEMS = [
    ("methods: []", "key 'methods': an empty list matches nothing"),
    ("methods: [get]", "key 'methods': 'get': write methods in upper case (GET)"),
    ("methods: ['GET /']", "key 'methods': 'GET /' is not an HTTP method"),
    ("methods: GET", "key 'methods': expected a list, got a string"),
    ("paths: [evil/**]", "key 'paths': 'evil/**': a path starts with '/'"),
    ("paths: ['/a/../b']", "key 'paths': '/a/../b': dot segments never match"),
    ("paths: ['/a%2fb']", "key 'paths': '/a%2fb': paths are written decoded"),
    ("paths: ['/a/**b']", "key 'paths': '/a/**b': '**' must be a whole segment"),
    (
        "paths_case: upper\n    paths: [/a]",
        "key 'paths_case': 'upper' is not sensitive or insensitive",
    ),
    ("paths_case: insensitive", "key 'paths_case': needs 'paths'"),
    ("query: {service: []}", "key 'query': an empty list matches nothing"),
    ("query: {}", "key 'query': an empty mapping matches everything"),
    ("query: [service]", "key 'query': expected a mapping of parameter to value(s)"),
    ("query: {service: a, SERVICE: b}", "key 'query': duplicate parameter 'SERVICE'"),
    ("query: {'a b': c}", "key 'query': a string ('a b') is not a parameter name"),
    ("websocket: yes please", "key 'websocket': expected true or false"),
    ("max_request_bytes: -1", "key 'max_request_bytes': must be >= 0"),
    ("max_request_bytes: 1k", "key 'max_request_bytes': expected an integer"),
    (
        "graphql_operations: [mutations]",
        "key 'graphql_operations': 'mutations' is not an operation",
    ),
    ("json_body: {operation: [1]}", "key 'json_body': expected a string, got an integer"),
    ("inspect: 1", "key 'inspect': expected true or false"),
    ("methods: [GET]\n    ports: [22, 443]", "key 'ports': port 22 carries SSH"),
]


@pytest.mark.parametrize(("line", "expected"), REQUEST_PROBLEMS)
def test_request_condition_problems_name_file_line_rule_and_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\nrules:\n  - name: r\n    hosts: [a.test]\n    {line}\n")
    problems = problems_of(path)
    assert len(problems) == 1, [str(p) for p in problems]
    assert str(problems[0]).startswith("p.yaml:"), str(problems[0])
    assert f"rule 'r': {expected}" in str(problems[0])
    assert problems[0].line is not None and problems[0].line >= 4


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            "  - name: r\n    action: deny\n    hosts: [a.test]\n    max_request_bytes: 5\n",
            "key 'max_request_bytes': a size limit narrows what an allow rule allows",
        ),
        (
            "  - name: r\n    action: deny\n    hosts: [a.test]\n    inspect: true\n",
            "key 'inspect': a deny rule without request conditions refuses the whole host",
        ),
        (
            "  - name: r\n    cidrs: [203.0.113.0/24]\n    methods: [GET]\n",
            "request conditions and 'inspect' apply to host names",
        ),
    ],
)
def test_request_conditions_that_cannot_work_are_refused(
    tmp_path: Path, rule: str, expected: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n" + rule)
    problems = problems_of(path)
    assert any(expected in str(p) for p in problems), [str(p) for p in problems]


def test_ask_rules_take_a_timeout_and_a_review_mode(tmp_path: Path) -> None:
    from proxy.policy.model import DEFAULT_ASK_TIMEOUT, Review

    path = write(
        tmp_path,
        "p.yaml",
        """\
        version: 1
        rules:
          - name: push
            action: ask
            hosts: [github.com]
            timeout: 30
            review: auto
          - name: apis
            action: ask
            hosts: ["*.example.com"]
        """,
    )
    push, apis = load_policy(path).rules
    assert (push.action, push.timeout, push.review, push.ports) == (
        Action.ASK,
        30,
        Review.AUTO,
        frozenset({443}),
    )
    assert (apis.timeout, apis.review) == (DEFAULT_ASK_TIMEOUT, Review.HUMAN)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "  - name: a\n    hosts: [a.test]\n    timeout: 30\n",
            "p.yaml:5: rule 'a': key 'timeout': only 'action: ask' rules take this key",
        ),
        (
            "  - name: a\n    action: deny\n    hosts: [a.test]\n    review: auto\n",
            "p.yaml:6: rule 'a': key 'review': only 'action: ask' rules take this key",
        ),
        (
            "  - name: a\n    action: ask\n    hosts: [a.test]\n    timeout: 0\n",
            "p.yaml:6: rule 'a': key 'timeout': 0 is not a timeout (1-540 seconds)",
        ),
        (
            "  - name: a\n    action: ask\n    hosts: [a.test]\n    timeout: 541\n",
            "p.yaml:6: rule 'a': key 'timeout': 541 is not a timeout (1-540 seconds)",
        ),
        (
            "  - name: a\n    action: ask\n    hosts: [a.test]\n    timeout: 1.5\n",
            "p.yaml:6: rule 'a': key 'timeout': expected an integer",
        ),
        (
            "  - name: a\n    action: ask\n    hosts: [a.test]\n    review: model\n",
            "p.yaml:6: rule 'a': key 'review': 'model' is not human or auto",
        ),
    ],
)
def test_ask_settings_are_checked(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n" + body, encoding="utf-8")
    problems = problems_of(path)
    assert len(problems) == 1, [str(p) for p in problems]
    assert str(problems[0]).startswith(expected)


def test_a_rule_mode_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\nrules:\n"
        "  - {name: a, hosts: [a.example], mode: report}\n"
        "  - {name: b, hosts: [b.example], mode: enforce}\n"
        "  - {name: c, hosts: [c.example]}\n"
    )
    modes = {r.name: r.mode for r in load_policy(path).rules}
    assert modes == {"a": Mode.REPORT, "b": Mode.ENFORCE, "c": None}
    path.write_text(
        "version: 1\nrules:\n"
        "  - {name: a, hosts: [a.example], mode: audit}\n"
        "  - {name: b, action: ask, hosts: [b.example], mode: report}\n"
    )
    problems = [str(p) for p in problems_of(path)]
    assert problems == [
        "p.yaml:3: rule 'a': key 'mode': 'audit' is not a mode (enforce or report)",
        "p.yaml:4: rule 'b': key 'mode': an ask rule asks in every mode; drop 'mode' here",
    ]


def test_a_policy_or_include_that_is_not_a_regular_file_is_refused_without_waiting(
    tmp_path: Path,
) -> None:
    """A FIFO would block the reader until someone writes to it (and a gate with it)."""
    import os

    from proxy.policy.loader import PolicyError, load_policy

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(fifo)
    top = tmp_path / "top.yaml"
    top.write_text(f"version: 1\ninclude: [{fifo}]\nrules: []\n")
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(top)


@pytest.mark.parametrize(
    ("written", "key"),
    [
        ("ports: [0443]", "ports"),  # YAML 1.1 reads it as octal: port 291
        ("ports: [026]", "ports"),  # port 22
        ("ports: [1:20]", "ports"),  # base 60: port 80
        ("ports: [0x1bb]", "ports"),
        ("ports: [4_43]", "ports"),
        ("ports: [+443]", "ports"),
        ("max_request_bytes: 01000", "max_request_bytes"),  # 512
    ],
)
def test_a_number_written_other_than_in_decimal_is_refused(
    tmp_path: Path, written: str, key: str
) -> None:
    """What the gate enforces is what a reviewer reads: a number in any other YAML 1.1 form is
    refused with its line, never read as another value."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\nrules:\n  - name: api\n    hosts: [api.example.com]\n    {written}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    assert any(p.key == key and "decimal" in p.message for p in caught.value.problems), [
        str(p) for p in caught.value.problems
    ]


def test_decimal_numbers_still_load(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nrules:\n  - name: api\n    hosts: [api.example.com]\n    ports: [443, 8443, 0]\n"
    )
    with pytest.raises(PolicyError):  # (0 is no port: refused by the port check, not the number's)
        load_policy(policy)
    policy.write_text(
        "version: 1\nrules:\n  - name: api\n    hosts: [api.example.com]\n    ports: [443, 8443]\n"
    )
    assert sorted(load_policy(policy).rules[0].ports or ()) == [443, 8443]


def test_an_alias_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    """Each use of an alias is its whole node again: a 50 KB file of one 2,000-host list used by
    500 rules read as a million hosts (2.4 s; about 1 MB of text as gigabytes)."""
    hosts = ", ".join(f"h{i}.example.com" for i in range(2000))
    lines = ["version: 1", "rules:", "  - name: r0", f"    hosts: &h [{hosts}]"]
    lines += [f"  - {{name: r{i}, hosts: *h}}" for i in range(1, 500)]
    policy = tmp_path / "policy.yaml"
    policy.write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    assert "aliases" in str(caught.value) and ":5" in str(caught.value)
