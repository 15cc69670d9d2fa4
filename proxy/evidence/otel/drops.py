"""Why an OTLP export drops a record: the label values of ``egress_otlp_dropped_total``.

Shared by the export process, which counts the drops, and the gate's metrics registry, which exposes
them, without the export process importing the registry (``prometheus_client`` and its HTTP server
were a third of that process's start).
"""

from __future__ import annotations

OTLP_DROP_REASONS = ("queue_full", "shutdown", "encode", "rejected")
