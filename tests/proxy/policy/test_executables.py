"""Rules bound to executables load only for files the sandbox (or any non-root user) cannot replace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.policy.loader import load_policy
from proxy.policy.model import PolicyError

RULE = """
version: 1
rules:
  - name: tool-only
    hosts: [h.test]
    executables: [{path}]
"""


def _problems(tmp_path: Path, path: str, action: str = "") -> list[str]:
    policy = tmp_path / "p.yaml"
    text = RULE.format(path=path)
    if action:
        text += f"    action: {action}\n"
    policy.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(policy)
    return [str(p) for p in caught.value.problems]


def test_a_system_binary_loads_with_its_file_identity(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(RULE.format(path="/usr/bin/git"))
    (rule,) = load_policy(policy).rules
    st = os.stat("/usr/bin/git")
    assert [(e.path, e.identity) for e in rule.executables] == [
        ("/usr/bin/git", (st.st_dev, st.st_ino))
    ]


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_a_file_a_non_root_user_owns_or_may_write_is_refused(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o775)
    (problem,) = _problems(tmp_path, str(tool))
    assert problem.startswith(f"{tmp_path / 'p.yaml'}:6: rule 'tool-only': key 'executables': ")
    assert "writable by group or others" in problem
    tool.chmod(0o755)
    os.chown(tool, 65534, 65534)
    assert "owned by uid 65534" in _problems(tmp_path, str(tool))[0]
    os.chown(tool, 0, 0)
    os.chown(tmp_path, 65534, 65534)  # a directory above it: its owner could swap the file
    try:
        assert f"{tmp_path} is owned by uid 65534" in _problems(tmp_path, str(tool))[0]
    finally:
        os.chown(tmp_path, 0, 0)


def test_links_relative_paths_and_deny_rules_are_refused(tmp_path: Path) -> None:
    link = tmp_path / "git"
    link.symlink_to("/usr/bin/git")
    assert "is a link to /usr/bin/git" in _problems(tmp_path, str(link))[0]
    assert "not an absolute path" in _problems(tmp_path, "git")[0]
    assert "deny rule applies to every process" in _problems(tmp_path, "/usr/bin/git", "deny")[0]


def test_a_policy_says_whether_a_rule_of_it_or_its_ceiling_is_bound(tmp_path: Path) -> None:
    """`egress run` releases a command before its gate serves only when no decision can depend on
    the program behind a connection."""
    import dataclasses

    bound_file = tmp_path / "bound.yaml"
    bound_file.write_text(RULE.format(path="/usr/bin/git"))
    free_file = tmp_path / "free.yaml"
    free_file.write_text("version: 1\nrules:\n  - {name: any, hosts: [h.test]}\n")
    bound, free = load_policy(bound_file), load_policy(free_file)
    assert bound.binds_executables
    assert not free.binds_executables
    assert dataclasses.replace(free, ceiling=bound).binds_executables
