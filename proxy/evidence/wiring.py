"""Wiring of the evidence sinks (journal, metrics, OTel) behind the single Emitter, from CLI flags.

The CLI calls :func:`add_evidence_arguments` on the ``serve`` (and ``run``) parser and :func:`build_emitter`
with the parsed arguments; the gate then calls ``evidence.emitter.emit`` for every decision and the
``evidence.metrics`` / ``evidence.connection_*`` methods for facts that are not decisions.

The journal is the only write-ahead sink: under ``--audit-required`` an allow it cannot record becomes a
deny. Metrics and OTel are best effort and can never change a decision.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy import __version__
from proxy.core.decision import Decision, Kind
from proxy.evidence.emit import Emitter, Sink
from proxy.evidence.flags import DEFAULT_FSYNC, DEFAULT_MAX_BYTES
from proxy.evidence.flags import add_evidence_arguments as add_evidence_arguments  # re-export
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.export import CLOSED_EVENT, OtelSink, resolve_endpoint

log = logging.getLogger(__name__)


class EvidenceError(ValueError):
    """A bad evidence flag; the message names the flag."""


def parse_hostport(value: str, flag: str = "--metrics") -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise EvidenceError(f"{flag} wants HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464): {value!r}")
    return host, int(port_text)


@dataclass
class Evidence:
    """Everything that turns decisions into evidence, with one lifecycle (``start``/``close``)."""

    emitter: Emitter
    metrics: Metrics
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
            self.metrics_address = self.metrics.start(*self.metrics_listen)
            log.info("metrics on http://%s:%d/metrics", *self.metrics_address)

    def emit(self, decision: Decision) -> Decision:
        """Shorthand for ``emitter.emit``: enforce the decision this returns."""
        return self.emitter.emit(decision)

    def connection_opened(self, kind: Kind | str = Kind.CONNECT) -> None:
        self.metrics.connection_opened(kind)

    def active_sandboxes(self, count: int) -> None:
        """Sandboxes with at least one live connection to this gate."""
        self.metrics.set_active_sandboxes(count)

    def observe_latency(self, kind: Kind | str, seconds: float) -> None:
        """Time from a hook receiving a request to its decision being recorded (incl. DNS)."""
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
        self.metrics.connection_closed(
            decision.kind,
            rule=decision.rule,
            bytes_out=bytes_out,
            bytes_in=bytes_in,
            duration=duration,
        )
        attributes: dict[str, Any] = {
            "egress.decision.id": decision.id,
            "egress.kind": str(decision.kind),
            "server.address": decision.host,
            "egress.bytes.out": int(bytes_out),
            "egress.bytes.in": int(bytes_in),
            "egress.connection.duration": float(duration),
        }
        optional = {
            "server.port": decision.port,
            "egress.rule": decision.rule,
            "egress.sandbox.id": decision.sandbox_id,
            "client.address": decision.client,
        }
        attributes.update({k: v for k, v in optional.items() if v is not None})
        self.emitter.event(CLOSED_EVENT, attributes)

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
        self.metrics.stop()
        self.metrics_address = None

    def __enter__(self) -> Evidence:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_emitter(
    args: argparse.Namespace,
    base_sinks: Iterable[Sink] = (),
    *,
    env: Mapping[str, str] | None = None,
    export_timeout: float | None = None,
) -> Evidence:
    """The Emitter for these flags: journal write-ahead, then metrics, ``base_sinks`` and OTel.

    Raises :class:`EvidenceError` for a bad flag. Nothing listens until ``Evidence.start()``.
    """
    env = os.environ if env is None else env
    metrics = Metrics(version=__version__)
    listen: tuple[str, int] | None = None
    if not getattr(args, "no_metrics", False) and getattr(args, "metrics", None):
        listen = parse_hostport(str(args.metrics))
        try:
            loopback = ipaddress.ip_address(listen[0]).is_loopback
        except ValueError:
            loopback = listen[0] == "localhost"
        if not loopback:
            log.warning(
                "--metrics %s is not loopback: make sure no sandbox can reach it", args.metrics
            )
    journal: Journal | None = None
    journal_path = getattr(args, "journal", None)
    if journal_path:
        try:
            journal = Journal(
                journal_path,
                fsync=getattr(args, "journal_fsync", DEFAULT_FSYNC),
                max_bytes=int(getattr(args, "journal_max_bytes", DEFAULT_MAX_BYTES)),
                metrics=metrics,
            )
        except ValueError as exc:
            raise EvidenceError(str(exc)) from exc
    audit_required = bool(getattr(args, "audit_required", False))
    if audit_required and journal is None:
        raise EvidenceError("--audit-required needs --journal FILE")
    otel: OtelSink | None = None
    try:
        target = resolve_endpoint(
            getattr(args, "otlp_endpoint", None), getattr(args, "otlp_protocol", None), env
        )
    except ValueError as exc:
        raise EvidenceError(str(exc)) from exc
    if target is not None:
        otel = OtelSink(
            target, timeout=export_timeout, version=__version__, metrics=metrics, journal=journal
        )
        log.info("exporting decision events to %s over OTLP/%s", *target)
    base = list(base_sinks)
    sinks: list[Sink] = [metrics, *base]
    if otel is not None:
        sinks.append(otel)
    emitter = Emitter(
        sinks, write_ahead=[journal] if journal is not None else [], audit_required=audit_required
    )
    return Evidence(
        emitter=emitter,
        metrics=metrics,
        journal=journal,
        otel=otel,
        metrics_listen=listen,
        base_sinks=base,
    )
