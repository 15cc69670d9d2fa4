"""The write-ahead, hash-chained audit journal: proof of what every sandbox reached or was refused.

Each decision (and each connection-closed event) becomes one line of the hash chain
(:mod:`proxy.evidence.journal.chain`), written by :meth:`Journal.record` *before* the Emitter returns, so no
allowed connection is forwarded without its record having reached the kernel. ``egress audit verify``
(:mod:`proxy.evidence.journal.verify`) names the first file:line where the chain breaks.

Rotation is by size: when the active file would grow past ``max_bytes`` it is renamed to
``FILE.000001``, ``FILE.000002``, ... (higher = newer, never reused) and a new ``FILE`` is started. The
chain runs on across files: the first line of the new file carries the hash of the last line of the previous
one, so a missing or reordered rotated file is detected too. Rotated files are never deleted here: retention
of audit evidence is the operator's decision.

fsync policy and its trade-off (``--journal-fsync``):

``always``
    fsync after every record. A record survives power loss before the connection proceeds; costs one disk
    flush per decision (0.1-10 ms depending on the disk), which caps new tunnels/s on slow disks.
``interval`` (default)
    every record is written to the kernel synchronously (so it survives a crash of the gate itself) and a
    background thread fsyncs at most ``fsync_interval`` (0.25 s) later. Only an OS crash or power loss can
    lose records, and only those of the last quarter second. This is the usual choice for audit logs
    (journald, auditd's ``incremental`` flush) because it keeps decision latency independent of the disk.
``never``
    leave flushing to the kernel (typically within 30 s). For throughput tests only.

A failed write (disk full, file size limit, permissions, I/O error) leaves no torn line behind (the file is
truncated back to its previous length: a follower that read the line meanwhile sees it taken back,
:mod:`proxy.evidence.journal.follower`), does not advance the chain, counts ``egress_journal_errors_total``
and raises :class:`proxy.evidence.emit.AuditUnavailable`; the Emitter turns allows into denies under
``--audit-required``. Every later record retries the write, so the journal recovers on its own once space
is freed. Paths are recorded as received: the journal is local evidence (mode 0600); the OTel export
scrubs secrets before anything leaves the host.

A journal has one writer: the active file is held with ``flock`` while it is written, and a second
writer (another gate given the same path) fails its writes like a full disk until the first lets go.

After a crash in the middle of a write, the next start removes the partial last line (that record never
completed, so its connection never went ahead) and continues the chain from the last complete record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.core.decision import Decision
from proxy.evidence.emit import AuditUnavailable
from proxy.evidence.flags import (
    DEFAULT_FSYNC,
    DEFAULT_MAX_BYTES,
    FsyncPolicy,
    check_journal_settings,
)
from proxy.evidence.journal.chain import (
    CHAIN_KEYS,
    GENESIS,
    RETRACTED_BECAUSE,
    RETRACTED_EVENT,
    seal_encoded,
    seal_text,
)
from proxy.evidence.journal.files import journal_files, last_record, rotated_name, rotation_index
from proxy.evidence.journal.follower import JournalFollower
from proxy.evidence.serialised import Serialised, SerialisedDecision, serialise_decision

if TYPE_CHECKING:
    from proxy.evidence.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_FSYNC_INTERVAL = 0.25


def _identity(record: dict[str, Any] | Serialised, seq: int) -> dict[str, Any]:
    """What a retraction names of ``record``: its decision id (when it has one) and seq."""
    if isinstance(record, SerialisedDecision):
        return {"id": record.decision.id, "retracted_seq": seq}
    fields = record.fields if isinstance(record, Serialised) else record
    found = fields.get("id")
    return {"id": found, "retracted_seq": seq} if isinstance(found, str) else {"retracted_seq": seq}


def _error_kind(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "disk_full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission"
    return "other"


class Journal:
    """A write-ahead Emitter sink: ``Emitter(write_ahead=[Journal(...)])``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = DEFAULT_FSYNC,
        fsync_interval: float = DEFAULT_FSYNC_INTERVAL,
        max_bytes: int = DEFAULT_MAX_BYTES,
        metrics: Metrics | None = None,
        keep_unsynced: bool = False,
    ) -> None:
        check_journal_settings(fsync, max_bytes)
        # A record whose fsync failed stays in the file (True: its decision stands anyway, as
        # without --audit-required) or is removed and the decision refused (False).
        self.keep_unsynced = keep_unsynced
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        self._closed = False
        self._failing_since: float | None = None
        self._stranded = False  # the last failed write left its whole line behind
        self._retract: dict[str, Any] | None = None  # what the next line must take back
        self._last_error_log = 0.0
        self.seq, self.prev = 0, GENESIS
        try:
            self._open()
        except OSError as exc:  # record() retries, and fails closed under --audit-required
            log.error("audit journal %s cannot be opened: %s", self.path, exc)
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        if fsync == "interval":
            self._syncer = threading.Thread(
                target=self._sync_loop, name="journal-fsync", daemon=True
            )
            self._syncer.start()

    # -- state -------------------------------------------------------------------------------------

    def _resume(self) -> None:
        """Continue the chain of an existing journal (after a restart) from its newest record.

        Until the existing files can be read nothing is written: a fresh chain beside an unreadable
        old one would look like a forged journal."""
        for candidate in reversed(journal_files(self.path)):
            last = last_record(candidate)
            if last is not None:
                seq, digest = last["seq"], last["hash"]
                if type(seq) is not int or not isinstance(digest, str):  # edited: not continued
                    raise OSError(
                        errno.EINVAL, f"the last record of {candidate} has no valid seq and hash"
                    )
                self.seq, self.prev = seq, digest
                break

    def _open(self) -> None:
        """Open the active file as its only writer, then continue the chain as the files now end
        (another writer may have written since this one last held the file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._hold(fd)
            self._size = self._drop_torn_tail(fd)
            self._resume()
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _hold(self, fd: int) -> None:
        """Hold the active file for this writer alone (released when it is closed).

        A hash chain has one writer: two gates given the same ``--journal`` would each continue it
        from the same record, and every record after the first of the second writer's would break
        ``egress audit verify`` while both went on as if it were written. The second writer fails
        instead (an unrecordable decision, refused under ``--audit-required``). The lock is taken
        on the file the path names *now*: a file another writer rotated away is not the journal."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                errno.EBUSY, "another process is writing this journal (one writer per journal)"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without flock (some NFS, FUSE)
            raise OSError(
                exc.errno,
                f"cannot lock the journal for its one writer (flock: {exc.strerror}); keep it on "
                "a local file system",
            ) from None
        held = os.fstat(fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            raise OSError(errno.EBUSY, "another process rotated this journal as it was opened")

    def _drop_torn_tail(self, fd: int) -> int:
        """Remove a partial last line left by a crash or power loss in the middle of a write.

        Such a record never finished, so ``record()`` never returned and its connection never went ahead
        (write-ahead, like any WAL recovery). Left in place it would swallow the next record into one
        unparseable line."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        window = 64 * 1024
        while True:
            start = max(0, size - window)
            newline = os.pread(fd, size - start, start).rfind(b"\n")
            if newline >= 0 or start == 0:
                break
            window *= 4
        keep = start + newline + 1
        os.ftruncate(fd, keep)
        log.warning(
            "audit journal %s: removed a torn last line (%d bytes) left by an interrupted write",
            self.path,
            size - keep,
        )
        return keep

    def _next_index(self) -> int:
        indexes = [rotation_index(p) for p in journal_files(self.path)]
        return max((i for i in indexes if i is not None), default=0) + 1

    def _rotate(self) -> None:
        assert self._fd is not None
        old = self._fd
        os.fsync(old)
        # Renamed while still held, so no other writer can take the full file as the journal.
        os.rename(self.path, rotated_name(self.path, self._next_index()))
        self._fd = None
        try:
            self._fsync_dir()
            self._open()
        finally:
            os.close(old)
        if self.metrics is not None:
            self.metrics.journal_rotations.inc()

    def _fsync_dir(self) -> None:
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- sink protocol -----------------------------------------------------------------------------

    def record(self, decision: Decision) -> None:
        self.record_serialised(decision, serialise_decision(decision))

    def record_serialised(self, decision: Decision, serialised: Serialised) -> None:
        """:meth:`record` of a decision the Emitter built once for every sink; the text written is
        kept on it for the decision log."""
        self.event_serialised(serialised)

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.append({"ts": time.time(), **attributes, "event": name})

    def event_serialised(self, serialised: Serialised) -> None:
        """A record the Emitter built once (an event with its own ``ts``, or a decision)."""
        serialised.hashed = self._append(serialised)

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Write one chained record synchronously; raise AuditUnavailable if it is not on disk."""
        body = {k: v for k, v in fields.items() if k not in CHAIN_KEYS}
        self._append(body)
        return body

    def _append(self, record: dict[str, Any] | Serialised) -> bytes:
        """Chain ``record`` (a dict gains seq, prev and hash) and write it; returns the hashed text."""
        with self._lock:
            if self._closed:
                raise AuditUnavailable(f"{self.path}: journal is closed")
            seq = self.seq + 1
            writing = False  # this record's own line (not the chain's reading or a retraction)
            try:
                if self._fd is None:  # (held, and the chain read as the files now end)
                    self._open()
                if self._retract is not None:
                    self._write_retraction(self._retract)
                    self._retract = None
                seq = self.seq + 1
                if isinstance(record, Serialised):
                    digest, text, data = seal_encoded(record.chained(seq, self.prev))
                else:
                    record["seq"] = seq
                    record["prev"] = self.prev
                    digest, text, data = seal_text(record)
                writing = True
                self._write(data)
            except OSError as exc:
                if self._stranded:  # a whole line stays: the next line written takes it back
                    self._stranded = False
                    if writing:  # (a retraction's own line stays pending: it is written again)
                        self._retract = _identity(record, seq)
                self._count_error(exc)
                now = time.monotonic()
                if self._failing_since is None or now - self._last_error_log >= 10:
                    log.error(
                        "audit journal %s: write of seq %d failed (%s); every write fails until "
                        "this is fixed",
                        self.path,
                        seq,
                        exc,
                    )
                    self._last_error_log = now
                if self._failing_since is None:
                    self._failing_since = now
                raise AuditUnavailable(f"{self.path}: {exc.strerror or exc}") from exc
            if self._failing_since is not None:
                log.warning(
                    "audit journal %s: writing again after %.1f s of failures",
                    self.path,
                    time.monotonic() - self._failing_since,
                )
                self._failing_since = None
            self.seq, self.prev = seq, digest
            if self.metrics is not None:
                self.metrics.journal_writes.inc()
            if not isinstance(record, Serialised):
                record["hash"] = digest
            return text

    def _sync(self, fd: int) -> None:
        """``fsync`` after a record (``always``). Where a decision stands without its record
        (no ``--audit-required``), a record whose sync failed stays: the connection goes ahead
        either way, and the line is its record (counted and logged; a power loss may lose it)."""
        try:
            os.fsync(fd)
        except OSError as exc:
            if not self.keep_unsynced:
                raise
            self._count_error(exc)
            now = time.monotonic()
            if now - self._last_error_log >= 10:
                log.error(
                    "audit journal %s: fsync failed (%s); records are kept but may not survive a "
                    "power loss",
                    self.path,
                    exc,
                )
                self._last_error_log = now

    def _write_retraction(self, taken_back: dict[str, Any]) -> None:
        """A record whose line could not be removed after its write failed (``ftruncate`` failed
        too) is taken back by the next line: the chain runs on from it, and what it recorded did
        not stand (an allow became a deny)."""
        body: dict[str, Any] = {
            "ts": time.time(),
            "event": RETRACTED_EVENT,
            **taken_back,
            "detail": f"the record before this one is taken back: {RETRACTED_BECAUSE}",
        }
        body["seq"] = self.seq + 1
        body["prev"] = self.prev
        digest, _, data = seal_text(body)
        self._write(data)
        self.seq, self.prev = body["seq"], digest
        log.error(
            "audit journal %s: record seq %s taken back", self.path, taken_back.get("retracted_seq")
        )

    def _count_error(self, exc: OSError) -> None:
        if self.metrics is not None:
            self.metrics.journal_errors.labels(error=_error_kind(exc)).inc()

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._open()
        assert self._fd is not None
        if self._size > 0 and self._size + len(data) > self.max_bytes:
            try:
                self._rotate()
            except OSError as exc:  # the size limit is soft; losing the record would be worse
                log.error("audit journal %s: rotation failed, writing on: %s", self.path, exc)
                if self._fd is None:
                    self._open()
        assert self._fd is not None
        fd, before = self._fd, self._size
        written = -1
        try:
            written = os.write(fd, data)
            if written != len(
                data
            ):  # e.g. RLIMIT_FSIZE or ENOSPC part-way: no torn line may remain
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            if self.fsync == "always":
                self._sync(fd)
        except OSError:
            try:
                os.ftruncate(fd, before)
            except OSError:
                # could not undo: reopen next time so the size is re-read; verify will flag the torn line
                self._stranded = written == len(data)  # a whole line that did not stand
                self._reopen_after_error()
            raise
        self._size = before + len(data)
        self._dirty = True

    def _reopen_after_error(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval):
            self.sync()

    def sync(self) -> None:
        """fsync pending writes without holding the writers' lock during the flush."""
        with self._lock:
            if not self._dirty or self._fd is None:
                return
            fd = os.dup(self._fd)
            self._dirty = False
        try:
            os.fsync(fd)
        except OSError as exc:
            if self.metrics is not None:
                self.metrics.journal_errors.labels(error=_error_kind(exc)).inc()
            log.error("audit journal %s: fsync failed: %s", self.path, exc)
        finally:
            os.close(fd)

    def follow(self) -> JournalFollower:
        """A reader positioned exactly after the last record written, so nothing written from now on
        is missed."""
        with self._lock:
            return JournalFollower(self.path, offset=self._size, seq=self.seq)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=5)
        with self._lock:
            if self._retract is not None:  # not left for a restart to miss
                try:
                    if self._fd is None:
                        self._open()
                    self._write_retraction(self._retract)
                    self._retract = None
                except OSError as exc:
                    log.error(
                        "audit journal %s: a retraction could not be written: %s", self.path, exc
                    )
            self._closed = True
            if self._fd is not None:
                try:
                    if self.fsync != "never":
                        os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None
