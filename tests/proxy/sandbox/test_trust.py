"""The CA bundle a run writes for its sandbox: the sources in order, in a private directory with an
absolute path, removed afterwards whatever the sandbox left in it; a bundle that cannot be written
stops the run and leaves nothing behind."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from proxy.sandbox.trust import BUNDLE_NAME, bundle_trust, pem_bundle
from proxy.sandbox.usergate import Session

PEM_A = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\n"
PEM_B = "-----BEGIN CERTIFICATE-----\r\nBBBB\r\n-----END CERTIFICATE-----"


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "system.pem", tmp_path / "gate.pem"
    a.write_text(PEM_A)
    b.write_bytes(PEM_B.encode())
    return [a, b]


@pytest.fixture
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    return scratch


def test_the_bundle_holds_each_source_once_in_order(sources: list[Path]) -> None:
    assert pem_bundle(sources) == (PEM_A.rstrip("\n") + "\n" + PEM_B + "\n").encode()


def test_a_bundle_is_readable_in_a_private_directory_and_removed_with_what_was_left_there(
    sources: list[Path], tmpdir_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", "scratch")  # relative: the bundle's path is still absolute
    trust = bundle_trust(sources, ["/hidden"])
    assert trust.bundle is not None and os.path.isabs(trust.bundle)
    folder = os.path.dirname(trust.bundle)
    assert os.path.dirname(folder) == str(tmpdir_env)
    assert os.path.basename(trust.bundle) == BUNDLE_NAME
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(trust.bundle).st_mode) == 0o644
    assert Path(trust.bundle).read_bytes() == pem_bundle(sources)
    assert trust.hidden == ("/hidden",)
    # what a sandboxed command (same user, same file system) may leave there
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (Path(folder) / "dir" / "deeper").mkdir(parents=True)
    (Path(folder) / "dir" / "deeper" / "f").write_text("x")
    (Path(folder) / "link").symlink_to(outside, target_is_directory=True)
    (Path(folder) / "dir" / "link").symlink_to(outside, target_is_directory=True)
    trust.cleanup()
    assert not os.path.exists(folder)
    assert (outside / "keep").read_text() == "keep"  # links were removed, never followed
    assert list(tmpdir_env.iterdir()) == []


def test_a_source_that_cannot_be_read_leaves_nothing_behind(
    sources: list[Path], tmpdir_env: Path
) -> None:
    with pytest.raises(OSError):
        bundle_trust([*sources, sources[0].parent / "missing.pem"], [])
    assert list(tmpdir_env.iterdir()) == []


def _session(answer: dict[str, object], directory: Path) -> Session:
    conn, other = socket.socketpair()
    other.close()
    return Session(conn, str(directory), {}, answer)


def test_the_per_user_gates_bundle_is_the_same_and_its_failures_stop_the_run(
    sources: list[Path], tmpdir_env: Path, tmp_path: Path
) -> None:
    answer: dict[str, object] = {"inspects": True, "trust": [str(p) for p in sources]}
    session = _session(answer, tmp_path)
    trust = session.trust()
    assert trust.bundle is not None
    assert Path(trust.bundle).read_bytes() == pem_bundle(sources)
    assert str(tmp_path) in trust.hidden
    trust.cleanup()
    assert list(tmpdir_env.iterdir()) == []
    for parts in ([str(tmp_path / "missing.pem")], ["bad\0path"]):
        with pytest.raises(ValueError, match="cannot set up the sandbox's trust"):
            _session({"inspects": True, "trust": parts}, tmp_path).trust()
        assert list(tmpdir_env.iterdir()) == []


def test_a_tmpdir_that_cannot_take_the_directory_stops_the_private_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.app.ca import Inspection
    from proxy.app.private_gate import sandbox_trust
    from proxy.policy.loader import load_policy

    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - name: r\n    hosts: [a.test]\n    methods: [GET]\n")
    setup = sandbox_trust(Inspection(state_dir=str(tmp_path / "state")))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot set up the sandbox's trust"):
        setup(load_policy(path))
    assert not (tmp_path / "missing").exists()


def test_a_link_put_where_the_bundles_directory_was_is_removed_not_followed(
    sources: list[Path], tmpdir_env: Path, tmp_path: Path
) -> None:
    """A sandboxed command (same user, same file system) moves the directory away and leaves a link
    to another directory in its place: cleaning up removes the link, never what it points to."""
    trust = bundle_trust(sources, [])
    assert trust.bundle is not None
    folder = Path(trust.bundle).parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    folder.rename(tmp_path / "moved")
    folder.symlink_to(elsewhere, target_is_directory=True)
    trust.cleanup()
    assert not folder.exists() and not folder.is_symlink()
    assert (elsewhere / "keep").read_text() == "keep"
