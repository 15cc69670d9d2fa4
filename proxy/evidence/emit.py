"""The single point through which every decision becomes evidence.

Adapters call :meth:`Emitter.emit` exactly once per decision and must enforce the decision it *returns*,
not the one they passed in: a write-ahead sink (the audit journal) that cannot record an allow under
``--audit-required`` turns it into a deny here, so no connection proceeds without its record.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections import deque
from collections.abc import Iterable
from typing import IO, Any, Protocol, runtime_checkable

from proxy.core.decision import Decision, Reason, Verdict
from proxy.evidence.record import connection_closed, decision_record

log = logging.getLogger(__name__)


class AuditUnavailable(Exception):
    """Raised by a write-ahead sink that could not durably record a decision."""


class Sink(Protocol):
    """Something that records decisions. ``record`` runs on the proxy's event loop: keep it cheap."""

    def record(self, decision: Decision) -> None: ...

    def close(self) -> None: ...


class EventSink(Protocol):
    """Optional extension: sinks that also want non-decision events (e.g. connection closed)."""

    def event(self, name: str, attributes: dict[str, Any]) -> None: ...


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
    """One JSON object per line. ``json.dumps`` escapes control characters, so hostile host names
    cannot forge extra lines (threat 15)."""

    def __init__(self, stream: IO[str] | None = None, path: str | None = None) -> None:
        self._owned = path is not None
        self._stream: IO[str] = (
            open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the sink
            if path
            else (stream or sys.stderr)
        )
        self._lock = threading.Lock()

    def record(self, decision: Decision) -> None:
        self.write(decision_record(decision))

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.write({"event": name, **attributes})

    def write(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()


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

    def emit(self, decision: Decision) -> Decision:
        journaled = bool(self.write_ahead)
        for sink in self.write_ahead:
            try:
                sink.record(decision)
            except AuditUnavailable as exc:
                journaled = False
                if self.audit_required and decision.allowed:
                    decision = decision.with_(
                        decision=Verdict.DENY,
                        reason=Reason.AUDIT_UNAVAILABLE,
                        detail=f"the audit journal cannot be written: {exc}",
                    )
                else:
                    log.error(
                        "audit journal write failed, proceeding (not --audit-required): %s", exc
                    )
        for sink in self._plain:
            try:
                sink.record(decision)
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
        for sink, handler in zip(self.write_ahead, self._event_write_ahead, strict=True):
            if handler is None:
                journaled = False
                continue
            try:
                handler(name, attributes)
            except Exception:
                journaled = False
                log.exception("event sink %r failed", sink)
        for sink in self._event_sinks:
            try:
                sink.event(name, attributes)
            except Exception:
                log.exception("event sink %r failed", sink)
        for reader in self._readers:
            try:
                reader.event_journaled(name, attributes, journaled)
            except Exception:
                log.exception("event sink %r failed", reader)

    def close(self) -> None:
        for sink in [*self.write_ahead, *self.sinks]:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %r failed", sink)
