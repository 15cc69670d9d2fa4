"""The export cursor: the last journal seq the collector accepted, kept beside the journal.

It carries the backlog across restarts of the gate and of the export process: exactly once after a
clean stop, at least once after a crash (it is written at most once a second). It is replaced
atomically, so a crash never leaves half a number.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cursor_path(journal_path: Path) -> Path:
    """Hidden, so ``egress audit verify FILE*`` globs never pick it up."""
    return journal_path.with_name(f".{journal_path.name}.otlp-cursor")


def read_cursor(path: Path) -> int | None:
    """The last journal seq the collector accepted; None before the first export with this journal."""
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("OTLP export cursor %s unreadable, starting at the end: %s", path, exc)
        return None


def write_cursor(path: Path, seq: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(f"{seq}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("OTLP export cursor %s not written: %s", path, exc)
