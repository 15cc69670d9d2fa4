"""``egress audit verify``: every kind of after-the-fact edit is found and located."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.journal.chain import record_hash, render
from proxy.evidence.journal.files import journal_files, rotated_name
from proxy.evidence.journal.verify import EXIT_OK, EXIT_TAMPERED, EXIT_UNREADABLE, run, verify
from proxy.evidence.journal.writer import Journal


def make_journal(path: Path, count: int, max_bytes: int = 64 * 1024 * 1024) -> list[Path]:
    journal = Journal(path, max_bytes=max_bytes, fsync="never")
    for i in range(count):
        journal.record(
            Decision(
                decision=Verdict.ALLOW if i % 3 else Verdict.DENY,
                reason=Reason.ALLOWED_BY_RULE if i % 3 else Reason.NO_MATCHING_RULE,
                rule="pypi" if i % 3 else None,
                kind=Kind.CONNECT,
                host=f"h{i}.example",
                port=443,
                policy_version="v1",
                mode="enforce",
            )
        )
    journal.event("egress.connection.closed", {"bytes_out": 10, "bytes_in": 20, "duration": 0.5})
    journal.close()
    return journal_files(path)


def check(paths: list[Path]) -> tuple[int, str]:
    out = io.StringIO()
    code = run(paths, out)
    return code, out.getvalue()


def edit_line(path: Path, index: int, change: dict[str, object], rehash: bool = False) -> None:
    raw = path.read_text().splitlines(keepends=True)
    obj = json.loads(raw[index])
    digest = obj.pop("hash")
    obj.update(change)
    if rehash:
        digest = record_hash(obj)
    raw[index] = render(obj, digest)
    path.write_text("".join(raw))


@pytest.fixture
def single(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    make_journal(path, 10)
    return path


@pytest.fixture
def rotated(tmp_path: Path) -> list[Path]:
    files = make_journal(tmp_path / "audit.jsonl", 60, max_bytes=2048)
    assert len(files) >= 4
    return files


def test_intact_journal_passes(single: Path) -> None:
    code, out = check([single])
    assert code == EXIT_OK
    assert out.startswith("OK 11 records, seq 1..11")


def test_intact_rotated_journal_passes_in_any_order(rotated: list[Path]) -> None:
    shuffled = list(rotated)
    random.Random(7).shuffle(shuffled)
    code, out = check(shuffled)
    assert code == EXIT_OK, out


def test_edited_field_is_found(single: Path) -> None:
    edit_line(single, 3, {"decision": "allow"})
    code, out = check([single])
    assert code == EXIT_TAMPERED
    assert f"{single}:4: record seq 4 was edited" in out


def test_edit_with_recomputed_hash_breaks_the_next_link(single: Path) -> None:
    edit_line(single, 3, {"host": "innocent.example"}, rehash=True)
    code, out = check([single])
    assert code == EXIT_TAMPERED
    assert f"{single}:5: prev does not match" in out


def test_whitespace_edit_is_found(single: Path) -> None:
    raw = single.read_text().splitlines(keepends=True)
    raw[2] = raw[2].replace('"seq":', '"seq": ')
    single.write_text("".join(raw))
    code, out = check([single])
    assert code == EXIT_TAMPERED and f"{single}:3:" in out


def test_deleted_line_is_found(single: Path) -> None:
    raw = single.read_text().splitlines(keepends=True)
    del raw[5]
    single.write_text("".join(raw))
    code, out = check([single])
    assert code == EXIT_TAMPERED
    assert f"{single}:6: seq 7 follows seq 5: record(s) 6..6 were removed" in out


def test_swapped_lines_are_found(single: Path) -> None:
    raw = single.read_text().splitlines(keepends=True)
    raw[4], raw[5] = raw[5], raw[4]
    single.write_text("".join(raw))
    code, out = check([single])
    assert code == EXIT_TAMPERED
    assert f"{single}:5:" in out


def test_truncated_last_line_is_found(single: Path) -> None:
    data = single.read_bytes()
    single.write_bytes(data[:-15])
    code, out = check([single])
    assert code == EXIT_TAMPERED
    assert f"{single}:11: truncated record" in out


def test_removed_first_line_is_found(single: Path) -> None:
    raw = single.read_text().splitlines(keepends=True)
    single.write_text("".join(raw[1:]))
    code, out = check([single])
    assert code == EXIT_TAMPERED
    assert f"{single}:1: the chain starts at seq 2" in out


def test_removed_middle_rotated_file_is_found(rotated: list[Path]) -> None:
    rotated[1].unlink()
    code, out = check([p for p in rotated if p.exists()])
    assert code == EXIT_TAMPERED
    assert f"{rotated[2]}: rotated file(s) missing before this one: audit.jsonl.000002" in out


def test_removed_newest_rotated_file_is_found(rotated: list[Path]) -> None:
    newest_rotated = rotated[-2]
    newest_rotated.unlink()
    code, out = check([p for p in rotated if p.exists()])
    assert code == EXIT_TAMPERED
    assert f"{rotated[-1]}:1: seq" in out and "were removed" in out


def test_removed_oldest_rotated_file_is_found(rotated: list[Path]) -> None:
    rotated[0].unlink()
    code, out = check(rotated[1:])
    assert code == EXIT_TAMPERED
    assert f"{rotated[1]}:1: the chain starts at seq" in out
    # an operator who archived the oldest file on purpose can still check the rest
    assert verify(rotated[1:], require_genesis=False).ok


def test_edit_across_rotation_boundary_is_found(rotated: list[Path]) -> None:
    last = len(rotated[0].read_text().splitlines()) - 1
    edit_line(rotated[0], last, {"decision": "deny"}, rehash=True)  # a careful forger
    code, out = check(rotated)
    assert code == EXIT_TAMPERED
    assert f"{rotated[1]}:1: this file does not continue {rotated[0]}:{last + 1}" in out


def test_swapped_rotated_files_are_found(rotated: list[Path]) -> None:
    a, b = rotated[0], rotated[1]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    code, out = check(rotated)
    assert code == EXIT_TAMPERED
    assert f"{rotated[0]}:1: the chain starts at seq" in out


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    code, out = check([tmp_path / "nope.jsonl"])
    assert code == EXIT_TAMPERED and "no such file" in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert check([empty])[0] == EXIT_UNREADABLE
    assert check([])[0] == EXIT_UNREADABLE


def test_rotated_name_sorts_numerically(tmp_path: Path) -> None:
    assert rotated_name(tmp_path / "a.jsonl", 12).name == "a.jsonl.000012"
