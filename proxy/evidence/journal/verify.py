"""``egress audit verify FILE...``: prove an audit journal was not edited after it was written.

Files are put in journal order by name (``FILE.000001`` ... oldest first, then the active ``FILE``), so a
shell glob in any order works. The chain is walked line by line; the first break is reported as
``file:line: what is wrong`` and the exit status is non-zero. Walking stops there: after a break every later
line would be reported too, which buries the one that matters.

Exit status: 0 intact, 1 tampering or damage found, 2 nothing could be read (missing file, no records).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from proxy.evidence.journal.chain import GENESIS, record_hash, render
from proxy.evidence.journal.files import iter_lines, rotation_index

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_UNREADABLE = 2


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int  # 0: the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.message}"


@dataclass
class Report:
    files: list[Path]
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.records > 0

    @property
    def exit_code(self) -> int:
        if self.problems:
            return EXIT_TAMPERED
        return EXIT_OK if self.records else EXIT_UNREADABLE


def order_files(paths: Sequence[str | Path]) -> list[Path]:
    """Journal order: by base name, rotated files by number, the active file of each base last."""

    def key(p: Path) -> tuple[str, int]:
        index = rotation_index(p)
        if index is None:
            return (str(p), 1 << 62)
        return (str(p)[: -len(p.suffix)], index)

    return sorted({Path(p) for p in paths}, key=key)


def _missing_rotations(files: list[Path]) -> list[Problem]:
    """Gaps in the numbering (FILE.000001, FILE.000003): a whole rotated file was removed."""
    problems: list[Problem] = []
    previous: Path | None = None
    for path in files:
        index = rotation_index(path)
        prev_index = rotation_index(previous) if previous is not None else None
        if (
            index is not None
            and prev_index is not None
            and previous is not None
            and str(previous)[: -len(previous.suffix)] == str(path)[: -len(path.suffix)]
            and index != prev_index + 1
        ):
            missing = ", ".join(
                f"{path.name[: -len(path.suffix)]}.{i:06d}" for i in range(prev_index + 1, index)
            )
            problems.append(Problem(path, 0, f"rotated file(s) missing before this one: {missing}"))
        previous = path
    return problems


class _Walker:
    def __init__(self, report: Report, require_genesis: bool) -> None:
        self.report = report
        self.require_genesis = require_genesis
        self.expected_seq: int | None = None
        self.prev_hash: str | None = None
        self.prev_where: str | None = None

    def fail(self, path: Path, line: int, message: str) -> None:
        self.report.problems.append(Problem(path, line, message))

    def walk_file(self, path: Path) -> bool:
        """False as soon as the chain breaks."""
        first_in_file = True
        for number, raw in iter_lines(path):
            if not raw.endswith(b"\n"):
                self.fail(path, number, "truncated record: the last line has no line end")
                return False
            if not self.check(path, number, raw, first_in_file):
                return False
            first_in_file = False
        return True

    def check(self, path: Path, number: int, raw: bytes, first_in_file: bool) -> bool:
        try:
            obj: Any = json.loads(raw)
        except ValueError:
            self.fail(path, number, "not valid JSON: the record was edited or truncated")
            return False
        if not isinstance(obj, dict) or not {"seq", "prev", "hash"} <= obj.keys():
            self.fail(path, number, "not a journal record (seq, prev or hash missing)")
            return False
        digest = obj.pop("hash")
        seq, prev = obj.get("seq"), obj.get("prev")
        if not isinstance(seq, int) or not isinstance(prev, str) or not isinstance(digest, str):
            self.fail(path, number, "seq, prev or hash has the wrong type")
            return False
        if record_hash(obj) != digest or render(obj, digest).encode("ascii") != raw:
            self.fail(
                path, number, f"record seq {seq} was edited: its hash does not match its content"
            )
            return False
        if self.expected_seq is None:
            self.report.first_seq = seq
            if self.require_genesis and (seq != 1 or prev != GENESIS):
                self.fail(
                    path,
                    number,
                    f"the chain starts at seq {seq}, not 1: records 1..{seq - 1} (or the older "
                    "rotated files holding them) are missing",
                )
                return False
        else:
            if seq > self.expected_seq:
                self.fail(
                    path,
                    number,
                    f"seq {seq} follows seq {self.expected_seq - 1}: "
                    f"record(s) {self.expected_seq}..{seq - 1} were removed",
                )
                return False
            if seq < self.expected_seq:
                self.fail(
                    path,
                    number,
                    f"seq {seq} follows seq {self.expected_seq - 1}: records reordered or duplicated",
                )
                return False
            if prev != self.prev_hash:
                if first_in_file:
                    message = (
                        f"this file does not continue {self.prev_where}: prev does not match the "
                        "last hash there (a rotated file is missing, replaced or out of order)"
                    )
                else:
                    message = (
                        "prev does not match the previous record's hash: the chain was altered"
                    )
                self.fail(path, number, message)
                return False
        self.expected_seq = seq + 1
        self.prev_hash = digest
        self.prev_where = f"{path}:{number}"
        self.report.records += 1
        self.report.last_seq = seq
        self.report.last_hash = digest
        return True


def verify(paths: Sequence[str | Path], *, require_genesis: bool = True) -> Report:
    """Check the hash chain across ``paths`` (any order). ``require_genesis=False`` accepts a journal
    whose oldest rotated files were archived away: it then starts at whatever seq the first file holds."""
    files = order_files(paths)
    report = Report(files=files)
    for path in files:
        if not path.is_file():
            report.problems.append(Problem(path, 0, "no such file"))
    if report.problems:
        return report
    report.problems.extend(_missing_rotations(files))
    if report.problems:
        return report
    walker = _Walker(report, require_genesis)
    for path in files:
        try:
            if not walker.walk_file(path):
                break
        except OSError as exc:
            report.problems.append(Problem(path, 0, f"cannot be read: {exc.strerror or exc}"))
            break
    return report


def run(
    paths: Sequence[str | Path], out: IO[str] | None = None, *, require_genesis: bool = True
) -> int:
    """The CLI body: prints a verdict line per problem (or one OK line) and returns the exit status."""
    stream = out if out is not None else sys.stdout
    if not paths:
        print("egress audit verify: no journal files given", file=stream)
        return EXIT_UNREADABLE
    report = verify(paths, require_genesis=require_genesis)
    for problem in report.problems:
        print(f"FAIL {problem}", file=stream)
    if report.exit_code == EXIT_OK:
        print(
            f"OK {report.records} records, seq {report.first_seq}..{report.last_seq} in "
            f"{len(report.files)} file(s), head {report.last_hash}",
            file=stream,
        )
    elif not report.problems:
        print("FAIL no journal records found", file=stream)
    return report.exit_code
