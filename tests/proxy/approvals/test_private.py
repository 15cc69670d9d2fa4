"""Files that must be private to the gate's user."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.approvals.private import NotPrivate, read_private


def test_a_private_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"secret")
    path.chmod(0o600)
    assert read_private(path, "thing") == b"secret"
    path.chmod(0o400)
    assert read_private(path, "thing") == b"secret"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o610])
def test_any_access_for_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"secret")
    path.chmod(mode)
    with pytest.raises(
        NotPrivate, match=f"mode 0{mode:o} lets other users .* the thing; run chmod"
    ):
        read_private(path, "thing")


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(NotPrivate, match="cannot read the thing"):
        read_private(tmp_path / "missing", "thing")
