"""Export from the journal file: the records appended after the cursor, in order, each once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.evidence.journal.chain import RETRACTED_EVENT
from proxy.evidence.journal.follower import follow_after
from proxy.evidence.otel.cursor import cursor_path, write_cursor
from proxy.evidence.otel.encoder import LogEncoder
from proxy.evidence.otel.retry_queue import ReliableExporter, journal_seq
from proxy.evidence.otel.settings import DEFAULT_LIMITS, QueueLimits
from proxy.evidence.otel.transport import Transport
from proxy.evidence.record import Record

if TYPE_CHECKING:  # not imported in the export process (it passes no registry)
    from proxy.evidence.metrics import Metrics

log = logging.getLogger(__name__)


class JournalExporter:
    """Exports the records appended to a journal file, from the record after ``after_seq`` on.

    Runs in the export process (:mod:`proxy.evidence.otel.__main__`). The follower stops reading while the export
    queue is full, so a collector outage is buffered in the journal on disk, not in memory. The cursor
    file is rewritten at most once a second and on close: exactly once across clean restarts, at least
    once across crashes.
    """

    def __init__(
        self,
        path: Path,
        transport: Transport,
        *,
        after_seq: int,
        version: str = "0",
        metrics: Metrics | None = None,
        cursor: Path | None = None,
        limits: QueueLimits = DEFAULT_LIMITS,
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.cursor = cursor if cursor is not None else cursor_path(path)
        self.exported_seq = after_seq
        self._after_seq = after_seq
        self._cursor_written = 0.0
        self.processor = ReliableExporter(transport, LogEncoder(version), metrics, limits)
        self.processor.on_exported = self._exported
        self.follower = follow_after(path, after_seq)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="otlp-journal", daemon=True)
        self._thread.start()

    def _exported(self, batch: Sequence[Record]) -> None:
        # The last record's seq, in the journal's order: a follower's retraction (not a journal
        # line: no hash; the journal took back the record with its seq, and the one it kept with
        # that seq comes next) leaves the cursor before it, so a restart sends the kept one.
        seq = None
        for record in batch:
            got = journal_seq(record)
            if got is not None:
                taken_back = record.get("event") == RETRACTED_EVENT and "hash" not in record
                seq = got - 1 if taken_back else got
        if seq is not None:
            lowered = seq < self.exported_seq
            self.exported_seq = seq
            if lowered or time.monotonic() - self._cursor_written >= 1.0:  # (lowered: at once)
                write_cursor(self.cursor, self.exported_seq)
                self._cursor_written = time.monotonic()

    def _follow(self) -> None:
        last_error = 0.0
        while not self._stop.is_set():
            room = self.processor.room()
            try:
                records = self.follower.read(limit=min(room, 512)) if room > 0 else []
            except OSError as exc:  # the journal's own errors are counted by the journal
                if time.monotonic() - last_error > 30:
                    log.error("OTLP export cannot read the journal %s: %s", self.path, exc)
                    last_error = time.monotonic()
                self._stop.wait(0.5)
                continue
            after = self._after_seq
            self.processor.extend(
                [rec for rec in records if isinstance(seq := rec.get("seq"), int) and seq > after]
            )
            if not records:
                self._stop.wait(0.05)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is on disk now (bounded by ``timeout``), then stop and write the cursor."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.processor.depth() > 0:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(max(timeout, 1.0))
        if not self._thread.is_alive():  # never close the file under a read in progress
            self.follower.close()
        self.processor.close(max(0.1, deadline - time.monotonic()))
        write_cursor(self.cursor, self.exported_seq)
