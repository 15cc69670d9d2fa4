"""A file's identity is what a fresh open of its path would read: renames, symlink swaps, appends and
deletions are all changes, and a change is reported once, after it has settled."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.policy.watch import Watcher, identity


def settled(watcher: Watcher) -> bool:
    """Two polls: the first sees the change, the second (unchanged since) reports it."""
    return watcher.poll() or watcher.poll()


def test_nothing_changed_is_never_reported(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("a")
    watcher = Watcher(lambda: [path])
    assert not any(watcher.poll() for _ in range(5))


def test_a_change_is_reported_once_after_two_agreeing_polls(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("a")
    watcher = Watcher(lambda: [path])
    with path.open("a") as f:
        f.write("b")
    assert watcher.poll() is False  # first sight: the writer may not be done
    assert watcher.poll() is True
    assert watcher.poll() is False  # reported once


def test_a_write_still_going_on_postpones_the_report(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("a")
    watcher = Watcher(lambda: [path])
    for text in ("ab", "abc", "abcd"):
        path.write_text(text)
        assert watcher.poll() is False
    assert watcher.poll() is True


def test_an_atomic_rename_is_a_change_even_with_the_same_size_and_time(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("a")
    watcher = Watcher(lambda: [path])
    stat = path.stat()
    tmp = tmp_path / "p.yaml.tmp"
    tmp.write_text("b")
    os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp, path)
    assert settled(watcher)


def test_a_symlink_swap_and_a_deletion_are_changes(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "p.yaml").write_text("same")
    (tmp_path / "v2" / "p.yaml").write_text("same")
    data = tmp_path / "..data"
    data.symlink_to("v1")
    path = tmp_path / "p.yaml"
    path.symlink_to("..data/p.yaml")
    watcher = Watcher(lambda: [path])
    new = tmp_path / "..data_tmp"
    new.symlink_to("v2")
    os.replace(new, data)
    assert settled(watcher)
    before = identity(path)
    (tmp_path / "v2" / "p.yaml").unlink()
    assert identity(path) != before and "error" in str(identity(path)[1])
    assert settled(watcher)


def test_a_new_path_in_the_set_is_a_change(tmp_path: Path) -> None:
    paths = [tmp_path / "a.yaml"]
    paths[0].write_text("a")
    watcher = Watcher(lambda: list(paths))
    included = tmp_path / "b.yaml"
    included.write_text("b")
    paths.append(included)
    assert settled(watcher)
