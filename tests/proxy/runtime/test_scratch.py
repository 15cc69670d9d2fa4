"""Scratch files and directories without tempfile: unpredictable names, created by the call or not
at all, never through a symbolic link, private to the user."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.runtime import scratch

_URANDOM = os.urandom  # the real one, for names after the planted ones


def _names(*chunks: bytes) -> Iterator[bytes]:
    yield from chunks
    while True:
        yield _URANDOM(6)


def test_a_scratch_file_is_new_private_and_open_for_writing(tmp_path: Path) -> None:
    fd, path = scratch.create_exclusive(tmp_path, ".probe-")
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path).startswith(".probe-") and len(os.path.basename(path)) == 19
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Path(path).read_bytes() == b"x"
    other, second = scratch.create_exclusive(tmp_path, ".probe-")
    os.close(other)
    assert second != path


def test_a_name_already_taken_is_passed_over_even_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who guessed the next name and planted a link there gets nothing written through it."""
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    taken = b"\x00" * 6
    (tmp_path / f".probe-{taken.hex()}").symlink_to(target)
    names = _names(taken)
    monkeypatch.setattr(scratch.os, "urandom", lambda n: next(names))
    fd, path = scratch.create_exclusive(tmp_path, ".probe-")
    os.write(fd, b"new")
    os.close(fd)
    assert path != str(tmp_path / f".probe-{taken.hex()}")
    assert target.read_bytes() == b"keep"


def test_a_private_directory_is_made_under_tmpdir_and_removed_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    folder = scratch.private_dir("egress-trust-")
    assert os.path.dirname(folder) == str(tmp_path)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    (Path(folder) / "ca-bundle.pem").write_text("pem")
    scratch.remove_private_dir(folder)
    assert not os.path.exists(folder)
    scratch.remove_private_dir(folder)  # gone already: nothing to do, no error


def test_a_missing_tmpdir_is_an_error_not_a_reason_to_write_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        scratch.private_dir("egress-trust-")
    assert list(tmp_path.iterdir()) == []


def test_names_that_keep_colliding_end_in_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scratch.os, "urandom", lambda n: b"\x01" * n)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    (tmp_path / f".probe-{'01' * 6}").write_bytes(b"")
    (tmp_path / f"egress-trust-{'01' * 6}").mkdir()
    with pytest.raises(FileExistsError, match="no unused file name"):
        scratch.create_exclusive(tmp_path, ".probe-")
    with pytest.raises(FileExistsError, match="no unused directory name"):
        scratch.private_dir("egress-trust-")
