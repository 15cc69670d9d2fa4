"""The audit journal: chained, rotated, write-ahead, and failing closed on a full disk."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.core.decision import Kind, Reason, Verdict
from proxy.evidence.emit import AuditUnavailable, Emitter
from proxy.evidence.journal.chain import GENESIS, record_hash
from proxy.evidence.journal.files import journal_files, rotated_name
from proxy.evidence.journal.verify import verify
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from tests.proxy.evidence.decisions import allow
from tests.proxy.evidence.journal.journals import write_journal

ROOT = Path(__file__).resolve().parents[4]


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def test_records_are_hash_chained_and_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="always")
    ids = [allow(i) for i in range(3)]
    for d in ids:
        journal.record(d)
    journal.close()
    records = lines(path)
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    for r in records:
        body = {k: v for k, v in r.items() if k != "hash"}
        assert record_hash(body) == r["hash"]
        assert r["event"] == "egress.decision"
    assert [r["id"] for r in records] == [d.id for d in ids]
    assert verify([path]).ok
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_record_is_on_disk_before_emit_returns(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="never")
    emitter = Emitter(write_ahead=[journal], audit_required=True)
    d = allow()
    returned = emitter.emit(d)
    assert returned.decision is Verdict.ALLOW
    # read through a separate file description: the line reached the kernel before emit returned
    assert d.id in path.read_text()
    journal.close()


def test_hostile_host_cannot_forge_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path)
    journal.record(allow().with_(host='evil\n{"seq":99,"forged":true}\r\x00'))
    journal.close()
    assert len(path.read_bytes().splitlines()) == 1
    assert verify([path]).ok


def test_rotation_keeps_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    metrics = Metrics()
    journal = Journal(path, max_bytes=2048, metrics=metrics)
    for i in range(40):
        journal.record(allow(i))
    journal.close()
    files = journal_files(path)
    assert len(files) >= 3
    assert files[0] == rotated_name(path, 1)
    assert files[-1] == path
    for older, newer in itertools.pairwise(files):
        assert lines(newer)[0]["prev"] == lines(older)[-1]["hash"]
        assert older.stat().st_size <= 2048
    assert sum(len(lines(f)) for f in files) == 40
    report = verify(files)
    assert report.ok and report.records == 40, report.problems
    assert metrics.journal_rotations._value.get() == len(files) - 1
    assert metrics.journal_writes._value.get() == 40


def test_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_journal(path, 20, max_bytes=2048)
    second = Journal(path, max_bytes=2048)
    assert second.seq == 20
    second.record(allow(99))
    second.close()
    report = verify(journal_files(path))
    assert report.ok and report.last_seq == 21, report.problems


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_every_fsync_policy_writes_a_valid_journal(tmp_path: Path, policy: str) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync=policy, fsync_interval=0.01)  # type: ignore[arg-type]
    for i in range(5):
        journal.record(allow(i))
    journal.sync()
    journal.close()
    assert verify([path]).records == 5


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--journal-fsync"):
        Journal(tmp_path / "j", fsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--journal-max-bytes"):
        Journal(tmp_path / "j", max_bytes=10)


def test_unwritable_journal_denies_under_audit_required(tmp_path: Path) -> None:
    target = tmp_path / "is-a-directory"
    target.mkdir()  # even root cannot open a directory for writing
    metrics = Metrics()
    journal = Journal(target, metrics=metrics)
    with pytest.raises(AuditUnavailable):
        journal.record(allow())
    strict = Emitter(write_ahead=[journal], sinks=[metrics], audit_required=True)
    out = strict.emit(allow())
    assert out.decision is Verdict.DENY
    assert out.reason is Reason.AUDIT_UNAVAILABLE
    lenient = Emitter(write_ahead=[journal], audit_required=False)
    assert lenient.emit(allow()).decision is Verdict.ALLOW
    assert metrics.journal_errors.labels(error="other")._value.get() == 3
    journal.close()


DISK_FULL_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from proxy.evidence.journal.verify import verify
    from proxy.core.decision import Decision, Kind, Reason, Verdict
    from proxy.evidence.emit import Emitter
    from proxy.evidence.journal.writer import Journal
    from proxy.evidence.metrics import Metrics

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    path = Path(sys.argv[1])
    metrics = Metrics()
    journal = Journal(path, fsync="always", metrics=metrics)
    emitter = Emitter(write_ahead=[journal], audit_required=True)
    def d(i):
        return Decision(decision=Verdict.ALLOW, reason=Reason.ALLOWED_BY_RULE, rule="r",
                        kind=Kind.CONNECT, host=f"h{i}.example", port=443,
                        policy_version="v", mode="enforce")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))  # the "disk" holds 2000 bytes
    verdicts = [str(emitter.emit(d(i)).reason) for i in range(30)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is freed
    after = str(emitter.emit(d(100)).decision)
    journal.close()
    report = verify([path])
    print(json.dumps({
        "reasons": verdicts, "after": after, "size": path.stat().st_size,
        "ok": report.ok, "records": report.records, "problems": [str(p) for p in report.problems],
        "errors": metrics.journal_errors.labels(error="disk_full")._value.get(),
    }))
    """
)


def test_disk_full_denies_then_recovers(tmp_path: Path) -> None:
    """A real file-size limit (RLIMIT_FSIZE) in a child process: writes fail with EFBIG."""
    path = tmp_path / "audit.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, str(path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    reasons = result["reasons"]
    assert reasons[0] == "allowed-by-rule"
    assert "audit-unavailable" in reasons
    first_denied = reasons.index("audit-unavailable")
    assert all(r == "audit-unavailable" for r in reasons[first_denied:])
    assert result["errors"] == len(reasons) - first_denied
    assert result["after"] == "allow"  # recovered once space was available again
    # no torn line was left behind: the chain is intact and holds exactly the allowed records
    assert result["ok"], result["problems"]
    assert result["records"] == first_denied + 1


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root")
def test_full_tmpfs_denies_then_recovers(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    metrics = Metrics()
    journal = Journal(mnt / "audit.jsonl", fsync="always", metrics=metrics)
    try:
        emitter = Emitter(write_ahead=[journal], audit_required=True)
        assert emitter.emit(allow(0)).decision is Verdict.ALLOW
        filler = mnt / "filler"
        with open(filler, "wb") as f, pytest.raises(OSError):
            for _ in range(1000):
                f.write(b"x" * 4096)
                f.flush()
        # the journal's last page may still have room: keep going until the disk really is full
        verdicts = [emitter.emit(allow(i)) for i in range(1, 40)]
        denied = verdicts[-1]
        assert denied.decision is Verdict.DENY and denied.reason is Reason.AUDIT_UNAVAILABLE
        allowed = sum(1 for v in verdicts if v.allowed)
        assert allowed < 20
        assert metrics.journal_errors.labels(error="disk_full")._value.get() >= 1
        filler.unlink()
        assert emitter.emit(allow(99)).decision is Verdict.ALLOW
        journal.close()
        report = verify([mnt / "audit.jsonl"])
        assert report.ok and report.records == allowed + 2, report.problems
    finally:
        journal.close()
        if subprocess.run(["umount", str(mnt)], timeout=10, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], timeout=10, check=False)


def test_torn_last_line_from_a_crash_is_removed_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_journal(path, 3)
    with open(path, "ab") as f:
        f.write(b'{"decision":"allow","event":"egress.decision","host":"torn.exa')  # power cut
    assert not verify([path]).ok
    journal = Journal(path)
    assert journal.seq == 3
    survivor = allow(99)
    journal.record(survivor)
    journal.close()
    report = verify([path])
    assert report.ok and report.records == 4, report.problems
    assert lines(path)[-1]["id"] == survivor.id
    assert "torn.exa" not in path.read_text()


def test_restart_after_a_record_larger_than_the_tail_window(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path)
    journal.record(allow(0))
    journal.record(allow().with_(kind=Kind.HTTP, path="/" + "b" * 300_000))
    journal.close()
    again = Journal(path)
    assert again.seq == 2
    again.record(allow(2))
    again.close()
    assert verify([path]).ok


def test_a_torn_tail_longer_than_the_window_is_removed_exactly(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path)
    journal.record(allow(0))
    journal.close()
    with open(path, "ab") as f:
        f.write(b'{"path":"/' + b"c" * 200_000)  # torn in the middle of a huge record
    again = Journal(path)
    again.record(allow(1))
    again.close()
    report = verify([path])
    assert report.ok and report.records == 2, report.problems


def test_a_second_writer_of_one_journal_is_refused_and_the_chain_stays_whole(
    tmp_path: Path,
) -> None:
    """Two gates given the same ``--journal`` would each continue the chain from the same record:
    every record of the second would break ``egress audit verify`` while both went on as if their
    records were evidence. The second writer's records are unrecordable instead (a deny under
    ``--audit-required``) until the first lets go, and it then continues the chain as it ends."""
    path = tmp_path / "audit.jsonl"
    first = Journal(path, max_bytes=2048)
    second = Journal(path, max_bytes=2048)
    first.record(allow(0))
    strict = Emitter(write_ahead=[second], audit_required=True)
    refused = strict.emit(allow(1))
    assert (refused.decision, refused.reason) == (Verdict.DENY, Reason.AUDIT_UNAVAILABLE)
    for n in range(2, 30):  # across rotations of the first writer's
        first.record(allow(n))
        with pytest.raises(AuditUnavailable, match="another process is writing"):
            second.record(allow(n))
    first.close()
    second.record(allow(99))
    second.close()
    report = verify(journal_files(path))
    assert report.ok and report.last_seq == 30, report.problems
    assert len(journal_files(path)) > 2


def test_a_journal_whose_last_record_has_no_valid_seq_is_not_continued(tmp_path: Path) -> None:
    """Where the chain ends is read each time the writer takes the file: an edited last record
    (a seq that is not an integer) makes every record unrecordable, an allow a deny under
    ``--audit-required``, never an exception out of the Emitter."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"hash":"x","prev":"y","seq":"7"}\n')
    journal = Journal(path)
    out = Emitter(write_ahead=[journal], audit_required=True).emit(allow())
    assert (out.decision, out.reason) == (Verdict.DENY, Reason.AUDIT_UNAVAILABLE)
    journal.close()


def test_a_file_system_without_flock_says_so_and_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some NFS and FUSE mounts answer ``flock`` with ENOLCK: the journal cannot hold its one
    writer there, so nothing is recorded (a deny under ``--audit-required``), and the error says
    why rather than leaving an operator with a bare errno."""
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    journal = Journal(tmp_path / "audit.jsonl")
    with pytest.raises(AuditUnavailable, match=r"cannot lock the journal.*flock"):
        journal.record(allow(0))
    out = Emitter(write_ahead=[journal], audit_required=True).emit(allow(1))
    assert (out.decision, out.reason) == (Verdict.DENY, Reason.AUDIT_UNAVAILABLE)
    journal.close()


def test_a_record_that_could_neither_be_made_durable_nor_removed_is_taken_back_by_the_next_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--journal-fsync always``: the fsync failed (the allow becomes a deny) and so did the
    truncation that removes its line. The line stays, and the chain runs on from it: the next line
    is a retraction naming it, so the journal never says an allow stood that was refused."""
    import errno

    from proxy.evidence.journal.chain import RETRACTED_EVENT

    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="always")
    journal.record(allow(1))

    def fail(*_: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    stranded = allow(2)
    real_fsync, real_truncate = os.fsync, os.ftruncate
    monkeypatch.setattr(os, "fsync", fail)
    monkeypatch.setattr(os, "ftruncate", fail)
    with pytest.raises(AuditUnavailable):
        journal.record(stranded)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "ftruncate", real_truncate)
    after = allow(3)
    journal.record(after)
    journal.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line.get("id") for line in lines] == [
        lines[0]["id"],
        stranded.id,
        stranded.id,
        after.id,
    ]
    retraction = lines[2]
    assert retraction["event"] == RETRACTED_EVENT and retraction["retracted_seq"] == 2
    assert [line["seq"] for line in lines] == [1, 2, 3, 4]
    assert verify([path]).ok


def _stranding(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """Makes every fsync and ftruncate fail (True) or work again (False)."""
    import errno

    real = (os.fsync, os.ftruncate)

    def fail(*_: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    def stranding(on: bool) -> None:
        monkeypatch.setattr(os, "fsync", fail if on else real[0])
        monkeypatch.setattr(os, "ftruncate", fail if on else real[1])

    return stranding


def test_a_retraction_that_is_stranded_too_names_the_record_it_takes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next write fails the same way while writing the retraction: what is pending stays the
    first record's retraction (not the record that was never written), and is written again."""
    from proxy.evidence.journal.chain import RETRACTED_EVENT

    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="always")
    journal.record(allow(1))
    stranding = _stranding(monkeypatch)
    stranded, never = allow(2), allow(3)
    stranding(True)
    for decision in (stranded, never):
        with pytest.raises(AuditUnavailable):
            journal.record(decision)
    stranding(False)
    last = allow(4)
    journal.record(last)
    journal.close()
    records = lines(path)
    decision = "egress.decision"
    assert [r["event"] for r in records] == [
        decision, decision, RETRACTED_EVENT, RETRACTED_EVENT, decision,
    ]  # fmt: skip
    assert [r["id"] for r in records[1:4]] == [stranded.id] * 3
    assert records[4]["id"] == last.id and never.id not in path.read_text()
    assert verify([path]).ok


def test_a_pending_retraction_is_written_when_the_journal_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="always")
    journal.record(allow(1))
    stranding = _stranding(monkeypatch)
    stranded = allow(2)
    stranding(True)
    with pytest.raises(AuditUnavailable):
        journal.record(stranded)
    stranding(False)
    journal.close()
    records = lines(path)
    assert [r["id"] for r in records[1:]] == [stranded.id, stranded.id]
    assert records[2]["retracted_seq"] == 2 and verify([path]).ok


def test_without_audit_required_a_record_whose_fsync_failed_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its decision goes ahead either way (no ``--audit-required``): the line is its record, kept,
    counted and logged, never removed behind a connection that was made."""
    import errno

    metrics = Metrics()
    path = tmp_path / "audit.jsonl"
    journal = Journal(path, fsync="always", metrics=metrics, keep_unsynced=True)

    def fail(_: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    kept = allow(1)
    journal.record(kept)  # no AuditUnavailable
    monkeypatch.undo()
    journal.record(allow(2))
    journal.close()
    assert [r["seq"] for r in lines(path)] == [1, 2] and lines(path)[0]["id"] == kept.id
    assert metrics.journal_errors.labels(error="other")._value.get() == 1
