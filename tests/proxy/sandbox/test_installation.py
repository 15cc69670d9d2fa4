"""Which paths of the gate's installation a sandbox gets read-only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

import proxy
from proxy.sandbox.installation import installation_paths

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A virtual environment over a base interpreter, each in tmp_path."""
    base = tmp_path / "base"
    (base / "lib" / "python3.x").mkdir(parents=True)
    (base / "bin").mkdir()
    (base / "bin" / "python").write_text("")
    version = f"libpython{sys.version_info[0]}.{sys.version_info[1]}"
    (base / "lib" / f"{version}.so.1.0").write_text("")
    (base / "lib" / "libother.so").write_text("")
    venv = tmp_path / "venv"
    (venv / "lib" / "site-packages").mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", str(base))
    monkeypatch.setattr(sys, "executable", str(base / "bin" / "python"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def test_the_virtual_environment_the_interpreter_and_the_import_path(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = layout / "extra"
    extra.mkdir()
    monkeypatch.setattr(
        sys,
        "path",
        [
            "",
            str(layout / "base" / "lib" / "python3.x"),
            str(layout / "base" / "lib" / "python3x.zip"),  # missing: nothing to keep
            str(layout / "venv" / "lib" / "site-packages"),  # inside the venv: covered by it
            str(extra),
        ],
    )
    paths = installation_paths()
    version = f"libpython{sys.version_info[0]}.{sys.version_info[1]}"
    assert set(paths) == {
        str(layout / "venv"),
        str(layout / "base" / "lib" / "python3.x"),
        str(layout / "base" / "bin" / "python"),
        str(layout / "base" / "lib" / f"{version}.so.1.0"),
        str(extra),
        str(REPO / "proxy"),
        str(REPO / "addons"),
    }


def test_an_import_path_entry_that_holds_the_working_directory_is_not_kept_whole(
    layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent works there: only the gate's own packages in it are kept read-only."""
    monkeypatch.setattr(sys, "path", [str(layout / "work"), str(layout), str(REPO)])
    monkeypatch.chdir(REPO / "tests")
    paths = installation_paths()
    assert str(REPO) not in paths and str(layout) in paths
    assert {str(REPO / "proxy"), str(REPO / "addons")} <= set(paths)
    monkeypatch.chdir(layout / "work")
    paths = installation_paths((str(REPO / "docs"),))  # the command's own working directory
    assert str(REPO) not in paths and str(layout) not in paths


def test_this_installation_is_kept() -> None:
    paths = installation_paths()

    def covered(path: Path) -> bool:
        return any(path == Path(p) or Path(p) in path.parents for p in paths)

    if sys.prefix != sys.base_prefix:
        assert str(Path(sys.prefix).resolve()) in paths
    assert covered(Path(proxy.__file__).resolve().parent)
    assert covered(Path(os.__file__).resolve())  # the standard library
    assert covered(Path(sys.executable).resolve())
    assert "/" not in paths
