"""Wiring of the evidence sinks (journal, metrics, OTel) behind the single Emitter.

The CLI adds :func:`proxy.evidence.flags.add_evidence_arguments` to its parser and calls
``build_emitter(EvidenceConfig.from_args(args), sinks)``; the gate then calls ``evidence.emitter.emit``
for every decision and the ``evidence.metrics`` / ``evidence.connection_*`` methods for facts that are
not decisions.

The journal is the only write-ahead sink: under ``--audit-required`` an allow it cannot record becomes a
deny. Metrics and OTel are best effort and can never change a decision.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.core.authority import join_authority
from proxy.core.decision import Decision, Kind
from proxy.evidence.config import EvidenceConfig, EvidenceError
from proxy.evidence.emit import Emitter, Sink
from proxy.evidence.journal.writer import Journal
from proxy.evidence.otel.sink import OtelSink

if TYPE_CHECKING:
    from proxy.evidence.metrics import Metrics

__all__ = ["Evidence", "EvidenceConfig", "EvidenceError", "build_emitter"]

log = logging.getLogger(__name__)


@dataclass
class Evidence:
    """Everything that turns decisions into evidence, with one lifecycle (``start``/``close``)."""

    emitter: Emitter
    # None: nothing will ever read them (a private gate with no --metrics listener), so no registry
    # is built and prometheus-client (~50 ms of a run's start) is never imported.
    metrics: Metrics | None
    journal: Journal | None = None
    otel: OtelSink | None = None
    metrics_listen: tuple[str, int] | None = None
    metrics_address: tuple[str, int] | None = (
        None  # where /metrics is actually served, once started
    )
    base_sinks: list[Sink] = field(default_factory=list)

    def start(self) -> None:
        """Bind the metrics listener (the journal and exporter are already running)."""
        if self.metrics_listen is not None and self.metrics_address is None:
            assert self.metrics is not None  # build_emitter makes one whenever there is a listener
            self.metrics_address = self.metrics.start(*self.metrics_listen)
            log.info("metrics on %s", self.metrics_url)

    @property
    def metrics_url(self) -> str | None:
        """Where /metrics is served, once started: with port 0 asked for, the port is only known
        here, so a gate says it (``egress serve``'s log, ``egress run``'s stderr)."""
        if self.metrics_address is None:
            return None
        return f"http://{join_authority(*self.metrics_address)}/metrics"

    def emit(self, decision: Decision) -> Decision:
        """Shorthand for ``emitter.emit``: enforce the decision this returns."""
        return self.emitter.emit(decision)

    def connection_opened(self, kind: Kind | str = Kind.CONNECT) -> None:
        if self.metrics is not None:
            self.metrics.connection_opened(kind)

    def active_sandboxes(self, count: int) -> None:
        """Sandboxes with at least one live connection to this gate."""
        if self.metrics is not None:
            self.metrics.set_active_sandboxes(count)

    def observe_latency(self, kind: Kind | str, seconds: float) -> None:
        """Time from a hook receiving a request to its decision being recorded (incl. DNS)."""
        if self.metrics is not None:
            self.metrics.observe_decision_latency(kind, seconds)

    def connection_closed(
        self,
        decision: Decision,
        *,
        bytes_out: int,
        bytes_in: int,
        duration: float,
    ) -> None:
        """Pair of :meth:`connection_opened`: metrics plus an ``egress.connection.closed`` event
        (journal and OTel) carrying bytes each way and the duration in seconds."""
        if self.metrics is not None:
            self.metrics.connection_closed(
                decision.kind,
                rule=decision.rule,
                bytes_out=bytes_out,
                bytes_in=bytes_in,
                duration=duration,
            )
        self.emitter.connection_closed(
            decision, bytes_out=bytes_out, bytes_in=bytes_in, duration=duration
        )

    def close(self, timeout: float = 5.0) -> None:
        """Flush and stop everything; safe to call twice."""
        if self.otel is not None:
            self.otel.close(timeout)
        for sink in self.base_sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %r failed", sink)
        if self.journal is not None:
            self.journal.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.metrics_address = None

    def __enter__(self) -> Evidence:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_emitter(
    config: EvidenceConfig, base_sinks: Iterable[Sink] = (), *, on_demand: bool = False
) -> Evidence:
    """The Emitter for ``config``: journal write-ahead, then metrics, ``base_sinks`` and OTel.

    Nothing listens until ``Evidence.start()``. ``on_demand`` (a private gate, started for one
    command): the OTLP exporters start when there is a first record to send, not before the
    command may run (:class:`proxy.evidence.otel.sink.OtelSink`), and without a ``--metrics``
    listener no registry is built: nothing could ever read it.
    """
    listen = config.metrics_listen
    metrics: Metrics | None = None
    if listen is not None or not on_demand:
        from proxy.evidence.metrics import Metrics

        metrics = Metrics(version=__version__)
    if listen is not None and not _is_loopback(listen[0]):
        log.warning("--metrics %s:%d is not loopback: make sure no sandbox can reach it", *listen)
    journal: Journal | None = None
    if config.journal is not None:
        journal = Journal(
            config.journal,
            fsync=config.journal_fsync,
            max_bytes=config.journal_max_bytes,
            metrics=metrics,
            keep_unsynced=not config.audit_required,
        )
    otel: OtelSink | None = None
    if config.otlp is not None:
        otel = OtelSink(
            config.otlp,
            settings=config.otlp_settings,
            version=__version__,
            metrics=metrics,
            journal=journal,
            on_demand=on_demand,
        )
        log.info("exporting decision events to %s over OTLP/%s", *config.otlp)
    base = list(base_sinks)
    sinks: list[Sink] = [*([metrics] if metrics is not None else []), *base]
    if otel is not None:
        sinks.append(otel)
    emitter = Emitter(
        sinks,
        write_ahead=[journal] if journal is not None else [],
        audit_required=config.audit_required,
    )
    return Evidence(
        emitter=emitter,
        metrics=metrics,
        journal=journal,
        otel=otel,
        metrics_listen=listen,
        base_sinks=base,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
