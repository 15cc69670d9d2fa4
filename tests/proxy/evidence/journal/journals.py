"""Journals the journal tests write and read back."""

from __future__ import annotations

from pathlib import Path

from proxy.evidence.flags import DEFAULT_MAX_BYTES
from proxy.evidence.journal.files import journal_files
from proxy.evidence.journal.follower import JournalFollower
from proxy.evidence.journal.writer import Journal
from tests.proxy.evidence.decisions import allow


def write_journal(path: Path, count: int, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """``count`` allowed decisions in a closed journal; its files, oldest first."""
    journal = Journal(path, max_bytes=max_bytes)
    for i in range(count):
        journal.record(allow(i))
    journal.close()
    return journal_files(path)


def read_all(follower: JournalFollower, limit: int = 5) -> list[int]:
    """The seqs the follower hands out until it has nothing more (bounded)."""
    seen: list[int] = []
    for _ in range(1000):
        batch = follower.read(limit=limit)
        if not batch:
            return seen
        seen += [int(r["seq"]) for r in batch]
    raise AssertionError("the follower never ran out of records")
