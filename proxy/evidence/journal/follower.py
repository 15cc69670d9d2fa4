"""Reading a journal while it is written: records in order, across rotations, never a partial line.

The OTLP export process follows the journal this way, so events wait *on disk* while the collector is
down: the follower simply stops reading until the exporter has room again, and the backlog is bounded by
the journal itself.

A record can be taken back after it was read: with ``--journal-fsync always`` a line whose ``fsync``
fails is truncated away (the decision it recorded did not stand: its allow became a deny), and the next
record is written where it was. Each record names the hash of the one before (``prev``), so the
follower sees it: the next line does not chain to the last one it handed out, or the file ends before
it. It then checks that last line where it read it and, if it is gone, hands out a
``egress.journal.retracted`` record naming it and reads on from where it was (without this, the export
sent the allow and lost the next record, read from its middle).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.evidence.journal.chain import RETRACTED_BECAUSE, RETRACTED_EVENT
from proxy.evidence.journal.files import locate, rotated_files

log = logging.getLogger(__name__)

_DECODER = json.JSONDecoder()  # json.loads's own decoder, called on text directly


RECHECK_SECONDS = 2.0  # after a record is handed out, a read that finds nothing checks it is there


@dataclass
class _Position:
    ino: int
    offset: int


@dataclass
class _Handed:
    """The last record handed out: where it was read, its bytes, and its chain fields."""

    ino: int
    start: int
    raw: bytes
    record: dict[str, Any]
    at: float = 0.0  # time.monotonic() when it was handed out


class JournalFollower:
    """Reads records appended to a journal, across rotations, never consuming a partial line."""

    CHUNK = 256 * 1024

    def __init__(
        self,
        path: Path,
        *,
        offset: int = 0,
        seq: int = 0,
        start: Path | None = None,
        fd: int | None = None,
    ) -> None:
        """Reads ``start`` (default: the active file ``path``), or the already open ``fd``, from
        ``offset``; opened now, so the offset belongs to the file it was measured on."""
        self.path = path
        self.seq = seq  # last seq handed out
        self._fd: int | None = None
        self._pos: _Position | None = None
        self._last: _Handed | None = None
        self._quiet_mtime = 0  # the file's mtime when a read last found nothing new
        self._start_offset = offset
        if fd is not None:
            self._fd = fd
            self._pos = _Position(os.fstat(fd).st_ino, offset)
            self._start_offset = 0
        else:
            self._ensure_open(start)

    def _ensure_open(self, path: Path | None = None) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(path or self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self._fd = fd
        self._pos = _Position(os.fstat(fd).st_ino, self._start_offset)
        self._start_offset = 0
        return True

    def _open_successor(self) -> bool:
        """Open the file written after the one just finished (several rotations may have happened
        since): the lowest-numbered rotated file after it, else the active file. Rotated names are
        stable; the active name is not, so after opening it the rotations are listed again, and if the
        file opened may have come after one, that one is read first."""
        assert self._pos is not None
        for _ in range(50):
            rotated = rotated_files(self.path)
            ours = next((i for i, p in rotated if _inode(p) == self._pos.ino), None)
            if ours is not None:
                later = [p for i, p in rotated if i > ours]
                fd = _open(later[0] if later else self.path)
                if (
                    fd is not None
                    and not later
                    and any(i > ours for i, _ in rotated_files(self.path))
                ):
                    os.close(fd)  # rotated meanwhile: this may be a newer file
                    continue
                if fd is not None:
                    self._fd, self._pos = fd, _Position(os.fstat(fd).st_ino, 0)
                    return True
            time.sleep(0.01)  # a rotation is under way: look again
        log.error("journal follower: %s was rotated away before it was read", self.path)
        return self._ensure_open()

    def _read_lines(self, limit: int) -> list[dict[str, Any]]:
        assert self._fd is not None and self._pos is not None
        size = self.CHUNK
        while True:  # a record longer than a chunk (a huge URL path) must not stall the reader
            data = os.pread(self._fd, size, self._pos.offset)
            end = data.rfind(b"\n")
            if end >= 0 or len(data) < size:
                break
            size *= 2
        if end < 0:
            if not data and self._last is not None and self._changed_under():
                return self._retracted()
            return []
        chunk = data[: end + 1]
        # A journal is ASCII (its encoding escapes the rest): decoded once, a character is a byte,
        # and each line parses without json.loads's per-call detection of the bytes' encoding.
        ascii_text = chunk.decode("ascii") if chunk.isascii() else None
        lines: list[str] | list[bytes] = (
            ascii_text.split("\n") if ascii_text is not None else chunk.split(b"\n")
        )
        parse = _DECODER.decode if ascii_text is not None else json.loads
        out: list[dict[str, Any]] = []
        consumed = 0
        last: tuple[int, str | bytes, dict[str, Any]] | None = None
        for raw in lines[:-1]:
            start = self._pos.offset + consumed
            consumed += len(raw) + 1
            try:
                obj = parse(raw)  # type: ignore[arg-type]
            except ValueError:
                if not out and self._last is not None and self._gone():
                    return self._retracted()
                log.error("journal follower: unparseable line at %s byte %d", self.path, start)
                continue
            if not isinstance(obj, dict):
                continue
            if not out and self._last is not None and not self._chains(obj):
                if self._gone():
                    return self._retracted()
                if self._last.ino != self._pos.ino:
                    log.error(
                        "journal follower: the first record of %s (seq %s) does not chain to the "
                        "last one read before the rotation: records may be missing",
                        self.path,
                        obj.get("seq"),
                    )
            out.append(obj)
            last = (start, raw, obj)
            if len(out) >= limit:
                break
        self._pos.offset += consumed
        if last is not None:
            start, raw, obj = last
            data = raw.encode("ascii") if isinstance(raw, str) else raw
            self._last = _Handed(self._pos.ino, start, data + b"\n", obj, time.monotonic())
            self._quiet_mtime = 0  # the next read that finds nothing checks it once at least
        return out

    def _chains(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` follows the last one handed out (records without the chain's fields,
        written by hand, are taken as they come)."""
        assert self._last is not None
        prev, expected = record.get("prev"), self._last.record.get("hash")
        return prev is None or expected is None or prev == expected

    def _changed_under(self) -> bool:
        """Checked when a read finds nothing new: whether the last record handed out is gone. The
        file may end before what was read of it (nothing written since it was taken back), or be
        as long as before and changed (a record of the same length written where it was): its
        bytes are read again only then, once per change of a quiet file."""
        assert self._fd is not None and self._pos is not None and self._last is not None
        if self._last.start < 0 or self._last.ino != self._pos.ino:
            return False
        st = os.fstat(self._fd)
        if st.st_size < self._pos.offset:
            return self._gone()
        # A file's mtime can stay the same across writes within one clock tick: for a moment
        # after the last record was read, it is read again whether or not the mtime moved.
        fresh = time.monotonic() - self._last.at < RECHECK_SECONDS
        if st.st_mtime_ns == self._quiet_mtime and not fresh:
            return False
        self._quiet_mtime = st.st_mtime_ns
        return self._gone()

    def _gone(self) -> bool:
        """Whether the last record handed out is no longer where it was read (in this file)."""
        assert self._fd is not None and self._pos is not None and self._last is not None
        handed = self._last
        if handed.start < 0 or handed.ino != self._pos.ino:
            return False  # only its hash is known, or it was read from another (rotated) file
        return os.pread(self._fd, len(handed.raw), handed.start) != handed.raw

    def _retracted(self) -> list[dict[str, Any]]:
        """The last record handed out was taken back: a record saying so, and the reading goes on
        from where it was (the record written there since chains to the one before it)."""
        assert self._pos is not None and self._last is not None
        handed, self._last = self._last, None
        gone = handed.record
        log.error(
            "journal follower: record seq %s at %s byte %d was taken back by the journal after it "
            "was read (its write could not be made durable); reading on from there",
            gone.get("seq"),
            self.path,
            handed.start,
        )
        self._pos.offset = handed.start
        if isinstance(gone.get("prev"), str):  # the next record must chain to the one before it
            self._last = _Handed(handed.ino, -1, b"", {"hash": gone["prev"]})
        if isinstance(gone.get("seq"), int):
            self.seq = gone["seq"] - 1
        # Named as the record it takes back (its id and seq), so a collector can join the two.
        retraction: dict[str, Any] = {
            "event": RETRACTED_EVENT,
            "ts": time.time(),
            "seq": gone.get("seq"),
            "id": gone.get("id"),
            "detail": f"the audit journal took this record back after it was read: "
            f"{RETRACTED_BECAUSE}. The record with this seq that follows is the one it kept",
        }
        return [retraction]

    def read(self, limit: int = 512) -> list[dict[str, Any]]:
        """Up to ``limit`` new records (possibly none)."""
        if not self._ensure_open():
            return []
        out = self._read_lines(limit)
        if not out and self._rotated():
            out = self._read_lines(limit)  # the rest of the old file first
            if not out and self._last is not None and self._gone():
                out = self._retracted()  # taken back just before the file was rotated away
            if not out:
                os.close(self._fd)  # type: ignore[arg-type]
                self._fd = None
                if self._open_successor():
                    return self.read(limit)
        if out and out[-1].get("event") != RETRACTED_EVENT:
            self.seq = int(out[-1].get("seq", self.seq))
        return out

    def _rotated(self) -> bool:
        assert self._pos is not None
        try:
            return os.stat(self.path).st_ino != self._pos.ino or os.fstat(self._fd).st_nlink == 0  # type: ignore[arg-type]
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def follow_after(path: Path, after_seq: int) -> JournalFollower:
    """A follower that will hand out every record with a seq above ``after_seq`` (it may also hand out
    a few at or below it, which the caller skips), across rotations and without a gap."""
    try:
        fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    size = os.fstat(fd).st_size if fd is not None else 0
    found = locate(path, after_seq)  # after the fstat: a record it misses was appended after `size`
    if found is not None:
        if fd is not None:
            os.close(fd)
        return JournalFollower(path, offset=found[1], seq=after_seq, start=found[0])
    return JournalFollower(path, offset=size, seq=after_seq, fd=fd)
