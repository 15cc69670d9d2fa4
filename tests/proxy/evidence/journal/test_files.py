"""Journal files on disk: rotation order, the last complete record, and where a seq starts."""

from __future__ import annotations

from pathlib import Path

from proxy.evidence.journal.files import (
    journal_files,
    last_record,
    locate,
    rotated_name,
    rotation_index,
)
from tests.proxy.evidence.journal.journals import write_journal


def test_rotated_names_sort_by_number_and_the_active_file_comes_last(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for index in (10, 2, 1):
        rotated_name(path, index).write_text("")
    (tmp_path / "audit.jsonl.bak").write_text("")  # not a rotation
    (tmp_path / "other.jsonl.000001").write_text("")  # another journal's
    path.write_text("")
    assert journal_files(path) == [
        rotated_name(path, 1),
        rotated_name(path, 2),
        rotated_name(path, 10),
        path,
    ]
    assert rotation_index(rotated_name(path, 42)) == 42
    assert rotation_index(path) is None


def test_last_record_skips_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_journal(path, 3)
    with open(path, "ab") as f:
        f.write(b'{"seq":4,"prev":"')
    last = last_record(path, window=64)  # a window smaller than a record: it must grow
    assert last is not None and last["seq"] == 3
    assert last_record(tmp_path / "missing") is None


def test_locate_finds_the_file_and_offset_after_a_seq(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_journal(path, 40, max_bytes=2048)
    found = locate(path, 20)
    assert found is not None
    file, offset = found
    with open(file, "rb") as f:
        f.seek(offset)
        assert b'"seq":21,' in f.readline()
    assert locate(path, 40) is None
