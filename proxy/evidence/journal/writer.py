"""The write-ahead, hash-chained audit journal: proof of what every sandbox reached or was refused.

Each decision (and each connection-closed event) becomes one JSON line, written by :meth:`Journal.record`
*before* the Emitter returns, so no allowed connection is forwarded without its record having reached the
kernel. Every line carries ``seq`` (1, 2, 3, ... with no gaps), ``prev`` (the hash of the previous line,
64 zeros for the first) and ``hash``: SHA-256 over the canonical JSON of the line without ``hash``
(sorted keys, no spaces, ASCII only). Editing, removing or reordering a line breaks the chain, and
``egress audit verify`` (:mod:`proxy.evidence.journal.verify`) names the first file:line where it breaks.

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
truncated back to its previous length), does not advance the chain, counts ``egress_journal_errors_total``
and raises :class:`proxy.evidence.emit.AuditUnavailable`; the Emitter turns allows into denies under
``--audit-required``. Every later record retries the write, so the journal recovers on its own once space
is freed. Paths are recorded as received: the journal is local evidence (mode 0600); the OTel export
scrubs secrets before anything leaves the host.

After a crash in the middle of a write, the next start removes the partial last line (that record never
completed, so its connection never went ahead) and continues the chain from the last complete record.

Known limit of any hash chain: deleting whole lines from the *end* of the newest file leaves a valid,
shorter chain. Compare the last ``seq`` with an external anchor (the exported OTel events carry
``egress.journal.seq``) to detect that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.core.decision import Decision
from proxy.evidence.emit import AuditUnavailable
from proxy.evidence.flags import DEFAULT_FSYNC, DEFAULT_MAX_BYTES, FSYNC_POLICIES, FsyncPolicy
from proxy.evidence.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_FSYNC_INTERVAL = 0.25
GENESIS = "0" * 64
DECISION_EVENT = "egress.decision"
_ROTATED = re.compile(r"^(?P<base>.+)\.(?P<index>\d{6,})$")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def canonical(body: dict[str, Any]) -> str:
    """The exact text that is hashed: sorted keys, no spaces, ASCII only (control characters and
    non-ASCII escaped, so a hostile host name cannot forge a line)."""
    return _ENCODER.encode(body)


def record_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body).encode("ascii")).hexdigest()


def _with_hash(text: str, digest: str) -> str:
    return f'{text[:-1]}{"," if len(text) > 2 else ""}"hash":"{digest}"}}\n'


def render(body: dict[str, Any], digest: str) -> str:
    """The line as written: the canonical body with ``hash`` appended last, newline-terminated."""
    return _with_hash(canonical(body), digest)


def seal(body: dict[str, Any]) -> tuple[str, bytes]:
    """(hash, line) of a record, encoding it once."""
    text = canonical(body).encode("ascii")
    digest = hashlib.sha256(text).hexdigest()
    return digest, _with_hash(text.decode("ascii"), digest).encode("ascii")


def rotated_name(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index:06d}")


def rotation_index(path: Path) -> int | None:
    """The rotation number of ``FILE.000042`` (42), or None for an active journal file."""
    m = _ROTATED.match(path.name)
    return int(m.group("index")) if m else None


def journal_files(path: Path) -> list[Path]:
    """The rotated files of the journal at ``path`` (oldest first) followed by the active file."""
    rotated: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            m = _ROTATED.match(candidate.name)
            if m and m.group("base") == path.name:
                rotated.append((int(m.group("index")), candidate))
    files = [p for _, p in sorted(rotated)]
    if path.exists():
        files.append(path)
    return files


def _last_line(path: Path, window: int = 64 * 1024) -> dict[str, Any] | None:
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


def _error_kind(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "disk_full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission"
    return "other"


_journaled = threading.local()


def last_journaled() -> object:
    """The decision (or event attributes) the journal last wrote *on this thread*, or None after a
    failed write. The OTel sink uses it to know whether the journal follower will export an item or it
    must export it itself because the journal could not write it."""
    return getattr(_journaled, "obj", None)


DECISION_FIELDS = tuple(f.name for f in dataclasses.fields(Decision))


def decision_fields(decision: Decision) -> dict[str, Any]:
    """``Decision.to_dict()`` without ``asdict``'s deep copy (enums are str subclasses: JSON writes their
    values), since this runs on the proxy's event loop for every decision."""
    out = {}
    for name in DECISION_FIELDS:
        value = getattr(decision, name)
        if value is not None:
            out[name] = value
    return out


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
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(
                f"--journal-fsync must be one of {', '.join(FSYNC_POLICIES)}: {fsync!r}"
            )
        if max_bytes < 1024:
            raise ValueError(f"--journal-max-bytes must be at least 1024: {max_bytes}")
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
        self._last_error_log = 0.0
        self.seq, self.prev = 0, GENESIS
        self._resumed = False
        try:
            self._resume()
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
            last = _last_line(candidate)
            if last is not None:
                self.seq, self.prev = int(last["seq"]), str(last["hash"])
                break
        self._resumed = True

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._size = self._drop_torn_tail(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

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
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self.path, rotated_name(self.path, self._next_index()))
        self._fsync_dir()
        self._open()
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
        self.append({"event": DECISION_EVENT, **decision_fields(decision)})
        _journaled.obj = decision

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.append({"ts": time.time(), **attributes, "event": name})
        _journaled.obj = attributes

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Write one chained record synchronously; raise AuditUnavailable if it is not on disk."""
        _journaled.obj = None
        with self._lock:
            if self._closed:
                raise AuditUnavailable(f"{self.path}: journal is closed")
            try:
                if not self._resumed:
                    self._resume()
            except OSError as exc:
                self._count_error(exc)
                raise AuditUnavailable(
                    f"{self.path}: cannot read the existing journal: {exc}"
                ) from exc
            body = {k: v for k, v in fields.items() if k not in ("seq", "prev", "hash")}
            body["seq"] = self.seq + 1
            body["prev"] = self.prev
            digest, data = seal(body)
            try:
                self._write(data)
            except OSError as exc:
                self._count_error(exc)
                now = time.monotonic()
                if self._failing_since is None or now - self._last_error_log >= 10:
                    log.error(
                        "audit journal %s: write of seq %d failed (%s); every write fails until "
                        "this is fixed",
                        self.path,
                        body["seq"],
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
            self.seq, self.prev = body["seq"], digest
            if self.metrics is not None:
                self.metrics.journal_writes.inc()
            body["hash"] = digest
            return body

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
        try:
            written = os.write(fd, data)
            if written != len(
                data
            ):  # e.g. RLIMIT_FSIZE or ENOSPC part-way: no torn line may remain
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
            if self.fsync == "always":
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, before)
            except OSError:
                # could not undo: reopen next time so the size is re-read; verify will flag the torn line
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

    def follow(self, after_seq: int | None = None) -> JournalFollower:
        """A reader positioned exactly after record ``after_seq`` (default: the last one written), so
        nothing is read twice and nothing written from now on is missed."""
        with self._lock:
            if after_seq is not None and after_seq < self.seq:
                found = locate(self.path, after_seq)
                if found is not None:
                    path, offset = found
                    return JournalFollower(self.path, offset=offset, seq=after_seq, start=path)
                log.error("journal %s: no record after seq %d to resume from", self.path, after_seq)
            return JournalFollower(self.path, offset=self._size, seq=self.seq)

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=5)
        with self._lock:
            self._closed = True
            if self._fd is not None:
                try:
                    if self.fsync != "never":
                        os.fsync(self._fd)
                finally:
                    os.close(self._fd)
                    self._fd = None


@dataclass
class _Position:
    ino: int
    offset: int


class JournalFollower:
    """Reads records appended to a journal, across rotations, never consuming a partial line.

    Used by the OTel exporter so events wait *on disk* while the collector is down: the follower simply
    stops reading until the exporter has room again, and the backlog is bounded by the journal itself.
    """

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

    def _successor(self) -> Path:
        """The file written after the one just finished: several rotations may have happened since."""
        assert self._pos is not None
        files = journal_files(self.path)
        for i, candidate in enumerate(files[:-1]):
            try:
                if candidate.stat().st_ino == self._pos.ino:
                    return files[i + 1]
            except FileNotFoundError:
                continue
        log.error("journal follower: %s was rotated away before it was read", self.path)
        return self.path

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
        out: list[dict[str, Any]] = []
        consumed = 0
        for raw in data[: end + 1].split(b"\n")[:-1]:
            start = self._pos.offset + consumed
            consumed += len(raw) + 1
            try:
                obj = json.loads(raw)
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
                successor = self._successor()
                os.close(self._fd)  # type: ignore[arg-type]
                self._fd = None
                if self._ensure_open(successor):
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


def locate(path: Path, after_seq: int) -> tuple[Path, int] | None:
    """(file, byte offset) of the first record with a seq above ``after_seq``, or None."""
    for candidate in journal_files(path):
        last = _last_line(candidate)
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


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes incl. newline if present) of a journal file."""
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)
