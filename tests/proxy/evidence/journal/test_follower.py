"""Following a journal while it is written: in order, across rotations, never a partial line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.core.decision import Kind
from proxy.evidence.journal import follower as follower_module
from proxy.evidence.journal.files import journal_files
from proxy.evidence.journal.follower import follow_after
from proxy.evidence.journal.writer import Journal
from tests.proxy.evidence.decisions import allow
from tests.proxy.evidence.journal.journals import read_all, write_journal


def test_follower_reads_across_rotation_without_loss_or_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path, max_bytes=2048)
    journal.record(allow(-1))  # before the follower: must not be read
    follower = journal.follow()
    seen: list[int] = []
    for i in range(60):
        journal.record(allow(i))
        if i % 7 == 0:
            seen += [int(r["seq"]) for r in follower.read(limit=5)]  # type: ignore[call-overload]
    seen += read_all(follower)
    journal.close()
    follower.close()
    assert len(journal_files(path)) > 2
    assert seen == list(range(2, 62))


def test_follower_reads_records_longer_than_its_read_chunk(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path)
    follower = journal.follow()
    huge = allow().with_(kind=Kind.HTTP, method="GET", path="/" + "a" * 600_000)
    journal.record(huge)
    journal.record(allow(1))
    journal.close()
    got = follower.read(limit=10)
    follower.close()
    assert [r["id"] for r in got] == [huge.id, json.loads(path.read_text().splitlines()[1])["id"]]


def test_follow_after_resumes_exactly_after_a_seq_in_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert len(write_journal(path, 40, max_bytes=2048)) > 2
    follower = follow_after(path, 7)
    seen = read_all(follower)
    follower.close()
    assert [s for s in seen if s > 7] == list(range(8, 41))


def test_follow_after_the_last_record_waits_for_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_journal(path, 3)
    journal = Journal(path)
    follower = follow_after(path, 3)
    assert follower.read() == []
    journal.record(allow(99))
    journal.close()
    assert [r["seq"] for r in follower.read()] == [4]
    follower.close()


def test_a_rotation_while_moving_to_the_next_file_skips_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next file is the active one when the follower lists the files; the gate rotates it before
    the follower opens that name. The follower must read the renamed file, not the new one."""
    path = tmp_path / "audit.jsonl"
    journal = Journal(path, max_bytes=2048)
    for i in range(6):
        journal.record(allow(i))
    files = journal_files(path)
    assert len(files) == 2  # FILE.000001 (1-4) and the active FILE (5-6)
    follower = follow_after(path, 0)
    assert [r["seq"] for r in follower.read(limit=4)] == [1, 2, 3, 4]

    listed = follower_module.rotated_files
    rotate_once = [True]

    def list_then_rotate(p: Path) -> list[tuple[int, Path]]:
        found = listed(p)
        if rotate_once.pop() if rotate_once else False:
            for i in range(6, 9):  # FILE (5-8) becomes FILE.000002, a new FILE starts at 9
                journal.record(allow(i))
        return found

    monkeypatch.setattr(follower_module, "rotated_files", list_then_rotate)
    seen = read_all(follower)
    journal.close()
    follower.close()
    assert len(journal_files(path)) == 3
    assert seen == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("odd", ["ascii", "utf-8"])
def test_a_line_that_does_not_parse_is_skipped_and_the_offsets_stay_exact(
    tmp_path: Path, odd: str
) -> None:
    """The gate's own lines are ASCII, read as text at once; a file with other bytes in it (written
    by hand, or damaged) is read line by line as bytes, and in both cases an unparseable line is
    reported and skipped without moving any later record's boundary."""
    path = tmp_path / "audit.jsonl"
    bad = b"{not json\n" if odd == "ascii" else '{"x": "caf\u00e9" broken\n'.encode()
    good = [
        json.dumps({"seq": i, "v": "\u00e9" if odd == "utf-8" else "e"}).encode() for i in (1, 2)
    ]
    path.write_bytes(good[0] + b"\n" + bad + good[1] + b"\n" + b'{"seq": 3}')  # 3: partial
    follower = follower_module.JournalFollower(path)
    first = follower.read(limit=10)
    with path.open("ab") as f:
        f.write(b"\n")
    second = follower.read(limit=10)
    follower.close()
    assert [r["seq"] for r in first] == [1, 2]
    assert [r["seq"] for r in second] == [3]
    if odd == "utf-8":
        assert first[0]["v"] == "\u00e9"


def _records(follower: follower_module.JournalFollower) -> list[dict[str, object]]:
    """What the follower hands out until it has nothing more (bounded)."""
    out: list[dict[str, object]] = []
    for _ in range(100):
        batch = follower.read(limit=10)
        if not batch:
            return out
        out += batch
    raise AssertionError("the follower never ran out of records")


@pytest.mark.parametrize("then", ["longer", "shorter", "none"])
def test_a_record_the_journal_takes_back_after_it_was_read_is_retracted_and_none_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """``--journal-fsync always``: the export process read an allow whose fsync then failed. The
    journal truncated it (the allow became a deny) and wrote the next record where it was. The
    follower says the record was taken back, and hands out the next record whole: before, it
    read on from past the old line, into the middle of the new one (lost, or an unparseable
    line)."""
    import errno
    import os

    from proxy.evidence.emit import AuditUnavailable

    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="always")
    follower = journal.follow()
    journal.record(allow(1))
    assert [r["seq"] for r in follower.read()] == [1]
    read_in_the_window: list[dict[str, object]] = []
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        read_in_the_window.extend(follower.read())  # the export process, between write and fsync
        raise OSError(errno.EIO, "I/O error")

    taken_back = allow(2, path="/x" * 10)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(AuditUnavailable):
        journal.record(taken_back)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert [r["id"] for r in read_in_the_window] == [taken_back.id]

    kept = {"longer": allow(3, path="/y" * 40), "shorter": allow(3), "none": None}[then]
    if kept is None:  # nothing written since: the file only ends before what was read
        retraction, *rest = _records(follower)
        assert rest == []
    else:
        journal.record(kept)
    last = allow(4)
    journal.record(last)
    journal.close()
    got = _records(follower)
    follower.close()
    if kept is not None:
        retraction, *got = got
    assert retraction["event"] == follower_module.RETRACTED_EVENT
    assert (retraction["seq"], retraction["id"]) == (2, taken_back.id)
    written = [d for d in (kept, last) if d is not None]
    assert [(r["seq"], r["id"]) for r in got] == [(2 + i, d.id) for i, d in enumerate(written)]


def test_a_retraction_becomes_an_otel_event_naming_the_record_it_takes_back() -> None:
    from proxy.evidence.otel.encoder import LogEncoder

    record = {
        "event": follower_module.RETRACTED_EVENT,
        "ts": 1.0,
        "seq": 7,
        "id": "abc",
        "detail": "taken back",
    }
    encoded = LogEncoder("1").encode([record])
    assert encoded.failed == 0 and b"egress.journal.retracted" in encoded.payload
    assert b"egress.journal.seq" in encoded.payload and b"abc" in encoded.payload


@pytest.mark.parametrize("then", ["nothing", "a rotation"])
def test_a_record_taken_back_and_replaced_by_one_of_the_same_length_is_retracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    """The record written where the taken-back one was has its length: the follower's offset is
    then the file's end again, and no later line fails to chain (none may come, or the next one
    is in the next file). The file changed under the follower all the same."""
    import errno
    import os

    from proxy.evidence.emit import AuditUnavailable

    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="always")
    follower = journal.follow()
    journal.record(allow(1))
    assert [r["seq"] for r in follower.read()] == [1]

    def failing_fsync(fd: int) -> None:
        assert [r["seq"] for r in follower.read()] == [2]  # read in the window
        raise OSError(errno.EIO, "I/O error")

    taken_back, kept = allow(2, ts=1000.25), allow(3, ts=1000.25)  # lines of one length
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(AuditUnavailable):
        journal.record(taken_back)
    monkeypatch.setattr(os, "fsync", real_fsync)
    before = path.stat().st_size
    journal.record(kept)
    assert path.stat().st_size == before + len(path.read_bytes().splitlines(True)[-1])
    later = []
    if then == "a rotation":
        journal.max_bytes = path.stat().st_size + 1  # the next record starts a new file
        later = [allow(4), allow(5)]
        journal.record(later[0])
        journal.max_bytes = 1 << 20
        journal.record(later[1])
        assert len(journal_files(path)) == 2
    journal.close()
    got = _records(follower)
    follower.close()
    retraction, *rest = got
    assert retraction["event"] == follower_module.RETRACTED_EVENT
    assert (retraction["seq"], retraction["id"]) == (2, taken_back.id)
    expected = [(2, kept.id)] + [(3 + i, d.id) for i, d in enumerate(later)]
    assert [(r["seq"], r["id"]) for r in rest] == expected


def test_the_export_cursor_stays_before_a_record_taken_back_until_the_kept_one_is_sent(
    tmp_path: Path,
) -> None:
    """A restart resumes after the cursor's seq: left at the taken-back record's, it would skip the
    record the journal kept with that seq."""
    from proxy.evidence.otel.cursor import read_cursor
    from proxy.evidence.otel.journal_export import JournalExporter

    cursor = tmp_path / "cursor"
    exporter = JournalExporter.__new__(JournalExporter)  # only its cursor bookkeeping is used
    exporter.exported_seq = 0
    exporter._cursor_written = float("inf")  # written once a second: not in this test's time
    exporter.cursor = cursor
    exporter._exported([{"seq": 1}, {"seq": 2}])
    assert exporter.exported_seq == 2 and read_cursor(cursor) is None
    exporter._exported([{"event": follower_module.RETRACTED_EVENT, "seq": 2, "id": "x"}])
    # lowered: written at once, so an export process that dies now resumes before it
    assert exporter.exported_seq == 1 and read_cursor(cursor) == 1
    exporter._exported([{"seq": 2}, {"seq": 3}])
    assert exporter.exported_seq == 3
