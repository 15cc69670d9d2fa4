"""Reading a journal while it is written: records in order, across rotations, never a partial line.

The OTLP export process follows the journal this way, so events wait *on disk* while the collector is
down: the follower simply stops reading until the exporter has room again, and the backlog is bounded by
the journal itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.evidence.journal.files import locate, rotated_files

log = logging.getLogger(__name__)

_DECODER = json.JSONDecoder()  # json.loads's own decoder, called on text directly


@dataclass
class _Position:
    ino: int
    offset: int


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
        for raw in lines[:-1]:
            start = self._pos.offset + consumed
            consumed += len(raw) + 1
            try:
                obj = parse(raw)  # type: ignore[arg-type]
            except ValueError:
                log.error("journal follower: unparseable line at %s byte %d", self.path, start)
                continue
            if isinstance(obj, dict):
                out.append(obj)
            if len(out) >= limit:
                break
        self._pos.offset += consumed
        return out

    def read(self, limit: int = 512) -> list[dict[str, Any]]:
        """Up to ``limit`` new records (possibly none)."""
        if not self._ensure_open():
            return []
        out = self._read_lines(limit)
        if not out and self._rotated():
            out = self._read_lines(limit)  # the rest of the old file first
            if not out:
                os.close(self._fd)  # type: ignore[arg-type]
                self._fd = None
                if self._open_successor():
                    return self.read(limit)
        if out:
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
