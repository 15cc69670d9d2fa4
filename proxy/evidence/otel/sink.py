"""The Emitter's OTel sink: every decision and connection-closed event becomes an OTLP log record.

With a journal, the export process (:mod:`proxy.evidence.otel.supervisor`) sends what the journal holds,
so the gate's own cost per decision is the journal write; the exporter's CPU (JSON parsing, scrubbing,
encoding, sending) does not compete with the proxy for the GIL. The Emitter says with every decision
whether the journal recorded it: what it did not (a full disk) is exported in-process, so losing the
journal does not also silence the telemetry. Without a journal everything is exported in-process from a
bounded memory queue; the event loop then pays only for queueing a dict.

Export failures, retries, drops and queue depth are Prometheus metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from proxy.core.decision import Decision
from proxy.evidence.journal.writer import Journal
from proxy.evidence.otel.endpoint import Protocol
from proxy.evidence.otel.settings import DEFAULT_LIMITS, ExporterSettings, QueueLimits
from proxy.evidence.otel.supervisor import LAUNCH_RETRY, ExportProcess
from proxy.evidence.record import decision_record

if TYPE_CHECKING:
    from proxy.evidence.metrics import Metrics
    from proxy.evidence.otel.retry_queue import ReliableExporter

log = logging.getLogger(__name__)


class OtelSink:
    """A best-effort sink and :class:`proxy.evidence.emit.JournalReader`."""

    def __init__(
        self,
        target: tuple[str, Protocol],
        *,
        settings: ExporterSettings | None = None,
        timeout: float | None = None,
        version: str = "0",
        metrics: Metrics | None = None,
        journal: Journal | None = None,
        limits: QueueLimits = DEFAULT_LIMITS,
        on_demand: bool = False,
    ) -> None:
        """``settings`` default to the standard variables (``timeout`` overriding theirs).

        ``on_demand`` (with a journal; a private gate's run): the export process starts at the
        first journaled record and the in-process exporter at the first record the journal could
        not take, so a run that makes no connection starts neither."""
        if settings is None:
            settings = ExporterSettings.from_env(timeout=timeout)
        self.metrics = metrics
        self.journal = journal
        self._target = target
        self._settings = settings
        self._version = version
        self._limits = limits
        self._making = threading.Lock()
        self._processor: ReliableExporter | None = None
        self._build_retry_at = 0.0
        self._closed = False
        self.process: ExportProcess | None = None
        if journal is None or not on_demand:
            # Built now, its start-up not paid under load; and before the export process, which a
            # failure here would otherwise leave running.
            self.processor  # noqa: B018
        if journal is not None:
            self.process = ExportProcess(
                journal,
                target,
                timeout=settings.timeout,
                version=version,
                metrics=metrics,
                limits=limits,
                on_demand=on_demand,
            )
            self.process.on_status = self._update_gauge
            if self._processor is not None:
                self._processor.backlog = self.process.backlog

    @property
    def processor(self) -> ReliableExporter:
        """The in-process exporter: every record without a journal, and what the journal could not
        take (a full disk)."""
        processor = self._processor
        if processor is None:
            with self._making:
                processor = self._processor
                if processor is None:
                    # Imported here: an on-demand sink's gate may never load protobuf at all.
                    from proxy.evidence.otel.encoder import LogEncoder
                    from proxy.evidence.otel.retry_queue import ReliableExporter
                    from proxy.evidence.otel.transport import make_transport

                    processor = ReliableExporter(
                        make_transport(*self._target, self._settings, self._version),
                        LogEncoder(self._version),
                        self.metrics,
                        self._limits,
                    )
                    if self.process is not None:
                        processor.backlog = self.process.backlog
                    self._processor = processor
        return processor

    def _fallback(self) -> ReliableExporter | None:
        """:attr:`processor`, or None while it cannot be built (then said every few seconds, not
        for every record: a gate whose journal failed must not also flood its log)."""
        if self._processor is not None:
            return self._processor
        now = time.monotonic()
        if now < self._build_retry_at:
            return None
        try:
            return self.processor
        except Exception:
            self._build_retry_at = now + LAUNCH_RETRY
            log.exception("the in-process OTLP exporter cannot be built: records the journal did "
                          "not take are not exported")  # fmt: skip
            return None

    def _update_gauge(self) -> None:
        if self._processor is not None:
            self._processor.update_gauge()
        elif self.metrics is not None and self.process is not None:
            self.metrics.otlp_queue_depth.set(self.process.backlog())

    def record_journaled(self, decision: Decision, journaled: bool) -> None:
        if journaled and self.process is not None:
            self.process.wanted()  # the export process sends it from the journal
            return
        processor = self._fallback()
        if processor is not None:
            processor.offer(decision_record(decision))

    def event_journaled(self, name: str, attributes: dict[str, Any], journaled: bool) -> None:
        if journaled and self.process is not None:
            self.process.wanted()
            return
        processor = self._fallback()
        if processor is not None:
            processor.offer({"ts": time.time(), **attributes, "event": name})

    def record(self, decision: Decision) -> None:
        """Export ``decision`` in-process (it is not in the journal)."""
        self.record_journaled(decision, False)

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.event_journaled(name, attributes, False)

    def flush(self, timeout: float = 5.0) -> bool:
        """Bounded wait until everything recorded so far (journal backlog included) was exported."""
        deadline = time.monotonic() + timeout
        if self.process is not None and not self.process.flush(timeout):
            return False
        if self._processor is None:
            return True
        return self._processor.flush(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is pending (bounded by ``timeout``), then stop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        if self.process is not None:
            self.process.close(max(0.1, deadline - time.monotonic()))
        if self._processor is not None:
            self._processor.close(max(0.1, deadline - time.monotonic()))
