"""Where a journal's records are on disk: the rotated files in order, and a record's file and offset.

Rotation renames the active ``FILE`` to ``FILE.000001``, ``FILE.000002``, ... (higher = newer, never
reused), so the order of the files is in their names and no index file can disagree with them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_ROTATED = re.compile(r"^(?P<base>.+)\.(?P<index>\d{6,})$")


def rotated_name(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index:06d}")


def rotation_index(path: Path) -> int | None:
    """The rotation number of ``FILE.000042`` (42), or None for an active journal file."""
    m = _ROTATED.match(path.name)
    return int(m.group("index")) if m else None


def rotated_files(path: Path) -> list[tuple[int, Path]]:
    """(rotation number, file) of the journal at ``path``, oldest first. A rotated file keeps its
    name for good, unlike the active file."""
    rotated: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            m = _ROTATED.match(candidate.name)
            if m and m.group("base") == path.name:
                rotated.append((int(m.group("index")), candidate))
    return sorted(rotated)


def journal_files(path: Path) -> list[Path]:
    """The rotated files of the journal at ``path`` (oldest first) followed by the active file."""
    files = [p for _, p in rotated_files(path)]
    if path.exists():
        files.append(path)
    return files


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes incl. newline if present) of a journal file."""
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def last_record(path: Path, window: int = 64 * 1024) -> dict[str, Any] | None:
    """The last complete, parseable record of a file; a torn final line (crash mid-write) is skipped.

    Reads backwards in a growing window, so a huge journal costs little and a huge record still works.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            while True:
                begin = max(0, size - window)
                f.seek(begin)
                lines = f.read(size - begin).split(b"\n")[:-1]  # after the last newline: torn/empty
                if begin > 0:
                    lines = lines[1:]  # the window starts inside a line: never trust that piece
                for raw in reversed(lines):
                    try:
                        obj = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(obj, dict) and "seq" in obj and "hash" in obj:
                        return obj
                if begin == 0:
                    return None
                window *= 4
    except (FileNotFoundError, IsADirectoryError):
        return None


def locate(path: Path, after_seq: int) -> tuple[Path, int] | None:
    """(file, byte offset) of the first record with a seq above ``after_seq``, or None."""
    for candidate in journal_files(path):
        last = last_record(candidate)
        if last is None or int(last["seq"]) <= after_seq:
            continue
        offset = 0
        for _, raw in iter_lines(candidate):
            try:
                seq = int(json.loads(raw)["seq"])
            except (ValueError, KeyError, TypeError):
                seq = -1
            if seq > after_seq:
                return candidate, offset
            offset += len(raw)
    return None
