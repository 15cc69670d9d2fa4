"""A file only the managed ceiling binds a rule to is read-only inside the sandbox too (threats 19,
20).

In report mode under a managed ceiling, a gap is let through only to the executables of the managed
rule that allows it: those files are what keeps the sandbox's other processes out. A sandbox that
runs as the file's owner could otherwise rewrite the binary in place (same path, same inode) and run
its own code as the trusted executable. A run with a gate of its own and one the per-user gate
serves must both keep it read-only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.policy.managed import load_with_ceiling
from proxy.sandbox.launcher import read_only_files
from tests.usergate_support import UserGateWorld
from tests.usergate_support import world as make_world


def _tool(tmp_path: Path) -> Path:
    tool = tmp_path / "bin" / "tool"
    tool.parent.mkdir(mode=0o755)
    tool.write_text("#!/bin/sh\necho genuine\n")
    tool.chmod(0o755)
    return tool


def _layers(tmp_path: Path, tool: Path) -> tuple[Path, Path]:
    managed = tmp_path / "managed.yaml"
    managed.write_text(
        f"version: 1\nrules:\n  - {{name: org-tool, hosts: [allowed.test], executables: [{tool}]}}\n"
    )
    local = tmp_path / "local.yaml"
    local.write_text("version: 1\nmode: report\nrules: []\n")
    return local, managed


def test_the_managed_rules_executables_are_among_the_files_kept_read_only(tmp_path: Path) -> None:
    tool = _tool(tmp_path)
    local, managed = _layers(tmp_path, tool)
    assert str(tool) in read_only_files(load_with_ceiling(local, managed))


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.skipif(os.getuid() != 0, reason="the sandbox can write root's files only as root")
@pytest.mark.parametrize("reuse", [False, True], ids=["own-gate", "per-user-gate"])
def test_a_file_the_ceiling_binds_is_read_only_inside_the_sandbox(
    world: UserGateWorld, tmp_path: Path, reuse: bool
) -> None:
    tool = _tool(tmp_path)
    local, managed = _layers(tmp_path, tool)
    script = (
        f"echo 'echo forged' >> {tool}; echo \"append=$?\"; "
        f'mv {tool} {tool}.old; echo "rename=$?"; {tool}'
    )
    flags = ["--reuse-gate"] if reuse else []
    result = world.run(
        *flags, "--quiet", "--policy", str(local), "--managed-policy", str(managed),
        "--", "sh", "-c", script,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "append=0" not in result.stdout and "rename=0" not in result.stdout
    assert "genuine" in result.stdout and "forged" not in tool.read_text()
    assert (world.gate_pid() is not None) == reuse, result.stderr
