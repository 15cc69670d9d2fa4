"""The gate's own installation is read-only inside every sandbox (threats 10, 20).

The next ``egress run`` and every gate it starts run this installation's Python outside the sandbox:
a ``.pth`` file planted in its site-packages runs before the launcher does anything, a module
planted among the gate's packages or the standard library runs when the gate imports it late, and
a script put in the virtual environment's ``bin`` runs in its place. A command running as the
installation's owner (a virtual environment the user created) must not be able to write any of
them, with a private gate and with the per-user gate alike.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.usergate_support import REPO, UserGateWorld
from tests.usergate_support import world as make_world


def _targets() -> list[Path]:
    """Directories of this installation the probe tries to write a new file into, each of which the
    test's own user can write outside the sandbox (else the probe there proves nothing)."""
    candidates = [
        Path(sys.prefix) / "bin",
        *(Path(p) for p in sys.path if p.endswith("-packages") and os.path.isdir(p)),
        REPO / "proxy",
        REPO / "addons",
        Path(os.path.dirname(os.__file__)),  # the standard library
    ]
    return [p for p in dict.fromkeys(candidates) if os.access(p, os.W_OK)]


@pytest.fixture
def world() -> Iterator[UserGateWorld]:
    yield from make_world()


@pytest.fixture
def planted() -> Iterator[list[Path]]:
    """The files the command tries to create (removed afterwards, should one have been made)."""
    name = f"zz_egress_probe_{uuid.uuid4().hex[:12]}"
    files = [
        d / (f"{name}.pth" if d.name.endswith("-packages") else f"{name}.py") for d in _targets()
    ]
    yield files
    for path in files:
        path.unlink(missing_ok=True)


@pytest.mark.netns
@pytest.mark.timeout(120)
@pytest.mark.parametrize("reuse", [False, True], ids=["own-gate", "per-user-gate"])
def test_a_command_cannot_plant_code_in_the_gates_installation(
    world: UserGateWorld, tmp_path: Path, planted: list[Path], reuse: bool
) -> None:
    if not any(p.parent.name.endswith("-packages") for p in planted):
        pytest.skip("this installation's site-packages is not writable by the test's user")
    control = tmp_path / "control.txt"
    steps = [f'printf "# probe\\n" > {p}; echo "plant{i}=$?"' for i, p in enumerate(planted)]
    steps.append(f'printf x > {control}; echo "control=$?"')
    flags = ["--reuse-gate"] if reuse else []
    result = world.run(*flags, "--quiet", "--", "sh", "-c", "; ".join(steps))
    assert result.returncode == 0, result.stderr
    assert "control=0" in result.stdout, result.stdout  # the sandbox can write elsewhere
    for index, path in enumerate(planted):
        assert f"plant{index}=" in result.stdout, result.stdout
        assert f"plant{index}=0" not in result.stdout, (path, result.stdout)
        assert not path.exists(), path
    assert (world.gate_pid() is not None) == reuse, result.stderr
