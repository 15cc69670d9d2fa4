"""The files a run's policy was read from are read-only inside its sandbox (threats 10, 20).

A command that runs as the owner of its policy file could otherwise widen the policy of every later
run: append an allow-all rule to the policy, to a file it includes, or to the managed ceiling, or
rename one away and put another in its place. A private gate and the per-user gate (which reads the
files again whenever they change) must both keep the policy, its includes and the ceiling read-only;
a policy file the sandbox cannot see at all (in a hidden directory) is kept from it as well.
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

WIDER = "\n  - {name: everything, hosts: ['**.test']}\n"


def _layers(directory: Path) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    shared = directory / "shared.yaml"
    shared.write_text("version: 1\nrules:\n  - {name: pkgs, hosts: [allowed.test]}\n")
    local = directory / "local.yaml"
    local.write_text("version: 1\ninclude: [shared.yaml]\nrules: []\n")
    managed = directory / "managed.yaml"
    managed.write_text("version: 1\nrules:\n  - {name: org, hosts: [allowed.test]}\n")
    return local, shared, managed


def test_the_policy_its_includes_and_the_ceiling_are_among_the_files_kept_read_only(
    tmp_path: Path,
) -> None:
    local, shared, managed = _layers(tmp_path)
    kept = read_only_files(load_with_ceiling(local, managed))
    assert {str(local), str(shared), str(managed)} <= set(kept)


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


def _attack(*files: Path) -> str:
    """Append to each file, then rename it away and put another file in its place."""
    steps = []
    for index, path in enumerate(files):
        steps += [
            f'printf %s {WIDER!r} >> {path}; echo "append{index}=$?"',
            f'mv {path} {path}.old; echo "rename{index}=$?"',
            f'cp /dev/null {path}.new && mv {path}.new {path}; echo "replace{index}=$?"',
            f'mv {path.parent} {path.parent}.moved; echo "movedir{index}=$?"',
        ]
    return "; ".join(steps)


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.skipif(os.getuid() != 0, reason="the sandbox can write root's files only as root")
@pytest.mark.parametrize("reuse", [False, True], ids=["own-gate", "per-user-gate"])
def test_a_command_cannot_rewrite_its_policy_its_includes_or_the_ceiling(
    world: UserGateWorld, tmp_path: Path, reuse: bool
) -> None:
    local, shared, managed = _layers(tmp_path / "policy")
    before = {path: path.read_text() for path in (local, shared, managed)}
    flags = ["--reuse-gate"] if reuse else []
    result = world.run(
        *flags, "--quiet", "--policy", str(local), "--managed-policy", str(managed),
        "--", "sh", "-c", _attack(local, shared, managed),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for index in range(3):
        for step in ("append", "rename", "replace", "movedir"):
            assert f"{step}{index}=" in result.stdout, result.stdout
            assert f"{step}{index}=0" not in result.stdout, result.stdout
    assert {path: path.read_text() for path in (local, shared, managed)} == before
    assert not list((tmp_path / "policy").glob("*.old"))
    assert (world.gate_pid() is not None) == reuse, result.stderr


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_policy_in_a_hidden_directory_runs_and_stays_out_of_reach(
    world: UserGateWorld,
) -> None:
    """The state directory is hidden from the sandbox: a policy kept there is not made read-only
    (there is nothing to mount it on inside), the run still starts, and the command sees nothing."""
    local, _, _ = _layers(world.state / "policies")
    result = world.run(
        "--quiet", "--policy", str(local), "--",
        "sh", "-c", f'cat {local} >/dev/null 2>&1; echo "read=$?"',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read=0" not in result.stdout, result.stdout


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_hosts_file_of_the_runs_own_is_read_only_inside(
    world: UserGateWorld, tmp_path: Path
) -> None:
    """The gate reads ``--hosts-file`` again whenever it changes: a line a command added would send
    an allowed name to an address of its choosing."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    result = world.run(
        "--quiet", "--hosts-file", str(hosts), "--",
        "sh", "-c", f'echo "203.0.113.9 allowed.test" >> {hosts}; echo "append=$?"',
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "append=" in result.stdout and "append=0" not in result.stdout, result.stdout
    assert hosts.read_text() == "127.0.0.1 localhost\n"


def _linked_layers(directory: Path, through: str) -> tuple[Path, Path]:
    """The layers of :func:`_layers` in ``directory/real``, with the policy named through a link
    (``policy``), the include named through one (``include``) or a directory link (``dir``).
    Returns (the path to pass as --policy, the link a command would re-point)."""
    local, shared, _ = _layers(directory / "real")
    if through == "policy":
        link = directory / "local.yaml"
        link.symlink_to(local)
        return link, link
    if through == "include":
        link = directory / "real" / "team.yaml"
        link.symlink_to(shared)
        local.write_text("version: 1\ninclude: [team.yaml]\nrules: []\n")
        return local, link
    link = directory / "current"
    link.symlink_to(directory / "real")
    return link / "local.yaml", link


@pytest.mark.parametrize("through", ["policy", "include", "dir"])
def test_a_link_a_command_could_re_point_is_found_on_every_policy_path(
    tmp_path: Path, through: str
) -> None:
    from proxy.sandbox.launcher import relinkable

    named, link = _linked_layers(tmp_path, through)
    assert relinkable(load_with_ceiling(named, None)) == (str(link),)
    if through != "include":  # the control: named by the file itself
        assert relinkable(load_with_ceiling(tmp_path / "real" / "local.yaml", None)) == ()


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("reuse", [False, True], ids=["own-gate", "per-user-gate"])
@pytest.mark.parametrize("through", ["policy", "include", "dir"])
def test_a_policy_read_through_a_link_the_command_could_re_point_runs_nothing(
    world: UserGateWorld, tmp_path: Path, through: str, reuse: bool
) -> None:
    """A read-only mount keeps a file from being rewritten and a pinned directory from being
    renamed, but a link is neither: pointed at a file of the command's own, it would widen the next
    run's policy. Such a run does not start; named by the file itself, the same policy runs."""
    named, link = _linked_layers(tmp_path / "policy", through)
    marker = tmp_path / "ran"
    flags = ["--reuse-gate"] if reuse else []
    result = world.run(
        *flags, "--quiet", "--policy", str(named), "--", "touch", str(marker),
    )  # fmt: skip
    assert result.returncode == 125, result.stderr
    assert f"through the symbolic link {link}" in result.stderr, result.stderr
    assert not marker.exists()
    if through == "policy":  # the control: the file the link points to
        direct = tmp_path / "policy" / "real" / "local.yaml"
        result = world.run(*flags, "--quiet", "--policy", str(direct), "--", "touch", str(marker))
        assert result.returncode == 0, result.stderr
        assert marker.exists()
