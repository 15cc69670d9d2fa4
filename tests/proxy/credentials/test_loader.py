"""The credentials file: strict, every problem with file:line:credential, bindings only to hosts
the policy inspects (naming the policy file too)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from proxy.credentials.loader import CredentialsError, load_credentials
from proxy.policy.loader import load_policy

POLICY = """
version: 1
rules:
  - name: github
    hosts: [api.github.com, github.com]
    inspect: true
  - name: npm
    hosts: [registry.npmjs.org]
    inspect: true
  - name: plain
    hosts: [example.com]
"""


@pytest.fixture
def policy(tmp_path: Path) -> object:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return load_policy(path)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "credentials.yaml"
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


GOOD = """
version: 1
credentials:
  - name: github
    source: {env: GH_REAL}
    hosts: [api.github.com, github.com]
    header: Authorization
    basic: {username: x-access-token}
    env: [GH_TOKEN, GITHUB_TOKEN]
  - name: npm
    source: {file: /run/secrets/npm}
    hosts: [registry.npmjs.org]
    header: Authorization
    format: "Bearer {}"
    env: [NPM_TOKEN]
    npmrc: true
    methods: [GET, PUT]
    paths: ["/**"]
"""


def test_a_good_file(tmp_path: Path, policy: object) -> None:
    github, npm = load_credentials(write(tmp_path, GOOD), policy)  # type: ignore[arg-type]
    assert github.binding.hosts == {("api.github.com", 443), ("github.com", 443)}
    assert github.binding.delivery.basic and github.git  # basic means git by default
    assert github.binding.delivery.basic_username == "x-access-token"
    assert github.env == ("GH_TOKEN", "GITHUB_TOKEN") and github.source.env == "GH_REAL"
    assert npm.binding.delivery.formats == ("Bearer {}",) and npm.npmrc and not npm.git
    assert npm.binding.methods == {"GET", "PUT"} and npm.source.path == "/run/secrets/npm"


def problems(tmp_path: Path, text: str, policy: object, mode: int = 0o600) -> list[str]:
    with pytest.raises(CredentialsError) as info:
        load_credentials(write(tmp_path, text, mode), policy)  # type: ignore[arg-type]
    lines = info.value.lines()
    assert lines[-1].endswith("problem(s)")
    return lines[:-1]


def test_a_host_the_policy_does_not_inspect_names_both_files(
    tmp_path: Path, policy: object
) -> None:
    text = GOOD.replace("hosts: [registry.npmjs.org]", "hosts: [example.com, 'github.com:8443']")
    found = problems(tmp_path, text, policy)
    assert len(found) == 2
    assert found[0].startswith(f"{tmp_path / 'credentials.yaml'}:12: credential 'npm': key 'hosts'")
    assert "example.com:443 is not inspected by" in found[0]
    assert str(tmp_path / "policy.yaml") in found[0]
    assert "github.com:8443" in found[1]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("header: Authorization\n    format", "header: Host\n    format"), "Host cannot carry"),
        (("hosts: [registry.npmjs.org]", "hosts: ['*.npmjs.org']"), "exact host names"),
        (("hosts: [registry.npmjs.org]", "hosts: [10.0.0.1]"), "not IPs"),
        (("{file: /run/secrets/npm}", "{file: relative/npm}"), "absolute path"),
        (("{env: GH_REAL}", "{vault: x}"), "expected env, file or command"),
        (("{env: GH_REAL}", "{env: GH_REAL, file: /x}"), "expected one of"),
        (("format: \"Bearer {}\"", "format: Bearer"), "needs one '{}'"),
        (("npmrc: true", "npmrc: yes please"), "expected true or false"),
        (("npmrc: true", "npmrc: !!bool maybe"), "expected true or false"),
        (("  - name: npm", "  - name: github"), "declared twice"),
        (("[NPM_TOKEN]", "[GH_TOKEN]"), "already set for credential 'github'"),
        (("  - name: npm", "  - name: 'bad name'"), "a name of letters"),
        (("methods: [GET, PUT]", "methods: ['GET /']"), "unexpected entry"),
        (("paths: [\"/**\"]", "paths: [\"x\"]"), "starts with '/'"),
        (("    env: [NPM_TOKEN]", "    colour: blue"), "unknown key"),
        (("version: 1", "version: 2"), "must be 1"),
    ],
)  # fmt: skip
def test_problems(tmp_path: Path, policy: object, change: tuple[str, str], expected: str) -> None:
    assert change[0] in GOOD
    found = problems(tmp_path, GOOD.replace(*change), policy)
    assert any(expected in line for line in found), found
    assert all(":" in line.split(" ")[0] for line in found)  # file:line first


def test_how_it_is_sent_is_required(tmp_path: Path, policy: object) -> None:
    text = GOOD.replace("    header: Authorization\n    basic: {username: x-access-token}\n", "")
    found = problems(tmp_path, text, policy)
    assert any("credential 'github': say how it is sent" in line for line in found), found


def test_a_file_others_can_write_is_refused(tmp_path: Path, policy: object) -> None:
    found = problems(tmp_path, GOOD, policy, mode=0o622)
    assert any("writable by group or others" in line for line in found)


def test_unreadable_and_invalid_yaml(tmp_path: Path, policy: object) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        load_credentials(tmp_path / "missing.yaml", policy)  # type: ignore[arg-type]
    assert "not valid YAML" in problems(tmp_path, "credentials: [", policy)[0]
