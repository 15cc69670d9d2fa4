"""The single point through which every decision becomes evidence.

Adapters call :meth:`Emitter.emit` exactly once per decision and must enforce the decision it *returns*,
not the one they passed in: a write-ahead sink (the audit journal) that cannot record an allow under
``--audit-required`` turns it into a deny here, so no connection proceeds without its record.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import IO, Any, Protocol, runtime_checkable

from proxy.core.decision import Decision, Reason, Verdict
from proxy.evidence.journal.chain import canonical
from proxy.evidence.record import connection_closed
from proxy.evidence.serialised import Serialised, serialise_decision, serialise_event

log = logging.getLogger(__name__)

JOURNAL_FAILURE_LOG_INTERVAL = 10.0
"""Seconds between the Emitter's log lines about records the journal could not take: the first is
said at once, the rest are counted into the next (a full disk fails every record, thousands a
second under load, and one log line each would flood the gate's log and cost its loop)."""


class AuditUnavailable(Exception):
    """Raised by a write-ahead sink that could not durably record a decision."""


class Sink(Protocol):
    """Something that records decisions. ``record`` runs on the proxy's event loop: keep it cheap."""

    def record(self, decision: Decision) -> None: ...

    def close(self) -> None: ...


class EventSink(Protocol):
    """Optional extension: sinks that also want non-decision events (e.g. connection closed)."""

    def event(self, name: str, attributes: dict[str, Any]) -> None: ...


class SerialisedSink(Protocol):
    """Optional extension: sinks that write records as text (the journal, the JSON log) take them
    encoded once by the Emitter for all of them (:mod:`proxy.evidence.serialised`)."""

    def record_serialised(self, decision: Decision, serialised: Serialised) -> None: ...

    def event_serialised(self, serialised: Serialised) -> None: ...


@runtime_checkable
class JournalReader(Protocol):
    """A best-effort sink that also reads the write-ahead journal (the OTLP exporter).

    It exports what the journal holds from the journal, so the Emitter tells it with every decision and
    event whether all write-ahead sinks recorded it; it then handles in-process only what they did not.
    """

    def record_journaled(self, decision: Decision, journaled: bool) -> None: ...

    def event_journaled(self, name: str, attributes: dict[str, Any], journaled: bool) -> None: ...

    def close(self) -> None: ...


class JsonLineSink:
    """One JSON object per line (sorted keys, compact, ASCII only: the journal's encoding of the same
    record, see :mod:`proxy.evidence.serialised`). Control characters are escaped, so hostile host
    names cannot forge extra lines (threat 15). A file is appended to with one ``write`` per line, as
    the line is recorded. A file it creates is mode 0600, as the journal is: its lines are the
    journal's text (hosts and paths as received), local evidence for its owner."""

    def __init__(
        self, stream: IO[str] | None = None, path: str | None = None, fd: int | None = None
    ) -> None:
        """``fd``: a file already open for appending (handed over by a launcher), owned from now."""
        self._owned = path is not None or fd is not None
        self._fd: int | None = fd
        self._stream: IO[str] | None = None
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        elif fd is None:
            self._stream = stream or sys.stderr
        self._lock = threading.Lock()

    def record(self, decision: Decision) -> None:
        self.write_line(serialise_decision(decision).line())

    def record_serialised(self, decision: Decision, serialised: Serialised) -> None:
        """:meth:`record`, with the decision encoded once for every sink (the Emitter's path)."""
        self.write_line(serialised.line())

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.write({"event": name, **attributes})

    def event_serialised(self, serialised: Serialised) -> None:
        self.write_line(serialised.line())

    def write(self, obj: dict[str, Any]) -> None:
        self.write_line((canonical(obj) + "\n").encode("ascii"))

    def write_line(self, line: bytes) -> None:
        with self._lock:
            if self._fd is not None:
                view = memoryview(line)
                while view:  # a regular file takes it whole unless the disk is full (then: raise)
                    view = view[os.write(self._fd, view) :]
            elif self._stream is not None:
                self._stream.write(line.decode("ascii"))
                self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class MemorySink:
    """Keeps the most recent decisions in memory (bounded): run summaries and tests read it."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self.decisions: deque[Decision] = deque(maxlen=maxlen)
        self.events: deque[tuple[str, dict[str, Any]]] = deque(maxlen=maxlen)

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.events.append((name, attributes))

    def close(self) -> None:
        pass


def _serialised(sink: object, method: str) -> Callable[..., None] | None:
    """The sink's method taking a :class:`Serialised` record, if it has one."""
    found = getattr(sink, method, None)
    return found if callable(found) else None


class Emitter:
    """Fans a decision out to write-ahead sinks first, then to best-effort sinks.

    Write-ahead sinks may raise :class:`AuditUnavailable`. With ``audit_required`` that turns an allow
    into a deny (reason ``audit-unavailable``); without it the failure is logged and counted by the
    sink itself and the decision stands. Best-effort sinks see the decision that stands and can never
    change it; a :class:`JournalReader` is also told whether the write-ahead sinks recorded it.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        *,
        write_ahead: Iterable[Sink] = (),
        audit_required: bool = False,
    ) -> None:
        self.write_ahead: list[Sink] = list(write_ahead)
        self.sinks: list[Sink] = list(sinks)
        self.audit_required = audit_required
        # checked once here, not per decision: which sinks read the journal, which take events
        self._readers = [s for s in self.sinks if isinstance(s, JournalReader)]
        self._plain = [s for s in self.sinks if not isinstance(s, JournalReader)]
        self._event_sinks: list[Any] = [s for s in self._plain if hasattr(s, "event")]
        self._event_write_ahead = [getattr(sink, "event", None) for sink in self.write_ahead]
        # Sinks that write the record as text take it encoded once (SerialisedSink), the others
        # the decision.
        self._write_ahead_calls = [
            (s, _serialised(s, "record_serialised")) for s in self.write_ahead
        ]
        self._plain_calls = [(s, _serialised(s, "record_serialised")) for s in self._plain]
        self._event_serialised_write_ahead = [
            _serialised(s, "event_serialised") for s in self.write_ahead
        ]
        self._event_serialised_sinks = [
            _serialised(s, "event_serialised") for s in self._event_sinks
        ]
        self._events_take_serialised = any(
            [*self._event_serialised_write_ahead, *self._event_serialised_sinks]
        )
        self._unjournaled = 0  # records the journal could not take since the last log line
        self._unjournaled_logged = -JOURNAL_FAILURE_LOG_INTERVAL

    def emit(self, decision: Decision) -> Decision:
        journaled = bool(self.write_ahead)
        serialised: Serialised | None = None
        for sink, takes_serialised in self._write_ahead_calls:
            try:
                if takes_serialised is None:
                    sink.record(decision)
                else:
                    if serialised is None:
                        serialised = serialise_decision(decision)
                    takes_serialised(decision, serialised)
            except AuditUnavailable as exc:
                journaled = False
                if self.audit_required and decision.allowed:
                    decision = decision.with_(
                        decision=Verdict.DENY,
                        reason=Reason.AUDIT_UNAVAILABLE,
                        detail=f"the audit journal cannot be written: {exc}",
                    )
                    serialised = None  # what the other sinks record is the deny
                    self._unjournaled_record(exc, False, refused=True)
                else:
                    self._unjournaled_record(exc, decision.allowed)
        for sink, takes_serialised in self._plain_calls:
            try:
                if takes_serialised is None:
                    sink.record(decision)
                else:
                    if serialised is None:
                        serialised = serialise_decision(decision)
                    takes_serialised(decision, serialised)
            except Exception:  # a best-effort sink must never break enforcement
                log.exception("decision sink %r failed", sink)
        for reader in self._readers:
            try:
                reader.record_journaled(decision, journaled)
            except Exception:
                log.exception("decision sink %r failed", reader)
        return decision

    def connection_closed(
        self, opened: Decision, *, bytes_out: int, bytes_in: int, duration: float
    ) -> None:
        """The ``egress.connection.closed`` event of a connection ``opened`` allowed."""
        self.event(
            *connection_closed(opened, bytes_out=bytes_out, bytes_in=bytes_in, duration=duration)
        )

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        """Non-decision events (connection closed): best effort, never blocks enforcement."""
        journaled = bool(self.write_ahead)
        # Encoded once when the journal and the log record the same fields (the event has its ts).
        shared: Serialised | None = None
        if self._events_take_serialised:
            try:
                shared = serialise_event(name, attributes)
            except Exception:  # each sink then encodes (and fails) on its own
                log.exception("event %s could not be encoded", name)
        for sink, handler, fast in zip(
            self.write_ahead,
            self._event_write_ahead,
            self._event_serialised_write_ahead,
            strict=True,
        ):
            if handler is None:
                journaled = False
                continue
            try:
                if shared is not None and fast is not None:
                    fast(shared)
                else:
                    handler(name, attributes)
            except AuditUnavailable as exc:
                journaled = False
                self._unjournaled_record(exc, None)
            except Exception:
                journaled = False
                log.exception("event sink %r failed", sink)
        for sink, fast in zip(self._event_sinks, self._event_serialised_sinks, strict=True):
            try:
                if shared is not None and fast is not None:
                    fast(shared)
                else:
                    sink.event(name, attributes)
            except Exception:
                log.exception("event sink %r failed", sink)
        for reader in self._readers:
            try:
                reader.event_journaled(name, attributes, journaled)
            except Exception:
                log.exception("event sink %r failed", reader)

    def _unjournaled_record(
        self, exc: AuditUnavailable, allowed: bool | None, *, refused: bool = False
    ) -> None:
        """Say that a record is missing from the journal: at once for the first, then at most every
        :data:`JOURNAL_FAILURE_LOG_INTERVAL` seconds with the count since (the journal counts each
        failure in ``egress_journal_errors_total``). ``allowed``: the decision's, None for an
        event; ``refused``: an allow refused for it (``--audit-required``)."""
        self._unjournaled += 1
        now = time.monotonic()
        if now - self._unjournaled_logged < JOURNAL_FAILURE_LOG_INTERVAL:
            return
        count, self._unjournaled, self._unjournaled_logged = self._unjournaled, 0, now
        if refused:
            stands = "refused (--audit-required)"
        elif allowed:
            stands = "the allow stands (not --audit-required)"
        elif allowed is None:
            stands = "events go unrecorded in the journal"
        else:
            stands = "the refusal stands"
        log.error(
            "audit journal write failed: %d record(s) not journaled since last said, %s: %s",
            count,
            stands,
            exc,
        )

    def close(self) -> None:
        if self._unjournaled:  # counted since the last line said so: said before the gate ends
            log.error(
                "audit journal write failed: %d record(s) not journaled since last said",
                self._unjournaled,
            )
            self._unjournaled = 0
        for sink in [*self.write_ahead, *self.sinks]:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %r failed", sink)
