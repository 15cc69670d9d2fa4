"""Code a sandboxed command plants in the directory its run was started in never runs in the gate
(threat 10). The gate imports some modules only when first needed, after the command is running
(dnspython at the first DNS question): ``python -m proxy.app.cli`` would look for them first in that
directory, which the command can write to. A planted ``dns`` package there ran in the gate, on the
host, before the gate's entry point took the directory off the front of the import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import clean_env, fresh_python

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_module_planted_in_the_runs_directory_never_runs_in_the_gate(tmp_path: Path) -> None:
    workdir = tmp_path / "repo"
    workdir.mkdir()
    marker = tmp_path / "planted-code-ran"
    (workdir / "plant.txt").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    command = (
        "mkdir dns h11 && cp plant.txt dns/__init__.py && cp plant.txt h11/__init__.py"
        " && (getent hosts example.test; getent hosts pypi.org) >/dev/null 2>&1; true"
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--", "sh", "-c", command],
        cwd=workdir,
        env={**clean_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (workdir / "dns" / "__init__.py").exists()  # the command did plant it
    assert "dnspython could not be imported" not in result.stderr  # the gate loaded the real one
    assert not marker.exists()


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_module_planted_in_the_commands_pythonpath_never_runs_in_the_gate(
    tmp_path: Path,
) -> None:
    """``PYTHONPATH=src egress run -- CMD``: the entry names the agent's own source, and it comes
    before site-packages on the import path. The gate leaves it off (a ``dns`` package written
    there is not the one it imports at the first DNS question), and the agent can still write it."""
    workdir = tmp_path / "repo"
    (workdir / "src").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (workdir / "plant.txt").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    command = (
        "mkdir src/dns && cp plant.txt src/dns/__init__.py"
        " && (getent hosts example.test; getent hosts pypi.org) >/dev/null 2>&1; true"
    )
    env = {**clean_env(), "PYTHONPATH": os.pathsep.join([str(ROOT), "src"])}
    result = subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--", "sh", "-c", command],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (workdir / "src" / "dns" / "__init__.py").exists()  # written: src is not read-only
    assert "dnspython could not be imported" not in result.stderr  # the gate loaded the real one
    assert not marker.exists()


def _path_after(cwd: Path, code: str, env: dict[str, str]) -> list[str]:
    return list(eval(fresh_python(code, cwd=cwd, env=env)))  # a repr of a list of strings


DROP = (
    "import sys; from proxy.runtime.safepath import drop_working_directory;"
    "drop_working_directory(); print(repr(sys.path))"
)


def test_the_working_directory_leaves_the_import_path(tmp_path: Path) -> None:
    path = _path_after(tmp_path, DROP, {**clean_env(), "PYTHONPATH": str(ROOT)})
    assert "" not in path and str(tmp_path) not in path
    assert str(ROOT) in path  # (from PYTHONPATH)


def test_a_checkout_run_in_place_is_not_on_the_path_before_the_libraries() -> None:
    """Run from the checkout itself: its packages stay importable (through the environment's links
    to them, or with the checkout put back after the standard library where there are none)."""
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    path = _path_after(ROOT, DROP + ";import addons", env)
    stdlib = os.path.dirname(os.__file__)
    assert "" not in path
    assert str(ROOT) not in path or path.index(str(ROOT)) > path.index(stdlib)


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_a_module_planted_at_the_checkouts_root_never_runs_in_a_later_interpreter(
    tmp_path: Path,
) -> None:
    """An agent working inside the checkout can write its root. The environment's import path
    names the checkout's two packages only (``scripts/link-packages``), never its root: a
    ``sitecustomize.py`` left there would otherwise run in every later interpreter of the
    environment, the next ``egress run`` launcher included, outside any sandbox."""
    planted = ROOT / "sitecustomize.py"
    if planted.exists():
        pytest.skip("the checkout has a sitecustomize.py of its own")
    marker = tmp_path / "planted-code-ran"
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--", "sh", "-c",
             f"echo \"open({str(marker)!r}, 'w')\" > {planted}; echo planted=$?"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "planted=0" in result.stdout, result.stdout  # the root stays the agent's to write
        later = subprocess.run(
            [sys.executable, "-c", "import proxy"], cwd="/", env=env, timeout=60, check=False
        )
        assert later.returncode == 0
        assert not marker.exists()
    finally:
        planted.unlink(missing_ok=True)
