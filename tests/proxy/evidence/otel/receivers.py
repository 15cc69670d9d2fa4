"""Sinks that export quickly to the real receivers of :mod:`tests.otlp_receiver`."""

from __future__ import annotations

from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.endpoint import resolve_endpoint
from proxy.evidence.otel.settings import QueueLimits
from proxy.evidence.otel.sink import OtelSink
from tests.otlp_receiver import GrpcReceiver, HttpReceiver

Receiver = GrpcReceiver | HttpReceiver


def make_sink(
    rx: Receiver,
    metrics: Metrics,
    journal: Journal | None = None,
    *,
    on_demand: bool = False,
    **kw: object,
) -> OtelSink:
    target = resolve_endpoint(rx.endpoint, rx.protocol, env={})
    assert target is not None
    limits = QueueLimits(flush_interval=0.05, max_backoff=0.3, **kw)  # type: ignore[arg-type]
    return OtelSink(
        target,
        timeout=1.0,
        version="9.9.9",
        metrics=metrics,
        journal=journal,
        limits=limits,
        on_demand=on_demand,
    )
