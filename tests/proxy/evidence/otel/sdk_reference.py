"""The OpenTelemetry SDK's own logs pipeline, as the reference our direct encoding and transports are
compared with: the same records through ``Logger.emit`` and the SDK's exporters."""

from __future__ import annotations

from typing import Any

from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import LogRecordExporter, SimpleLogRecordProcessor

from proxy.evidence.otel.attributes import attributes, decision_body, is_allow
from proxy.evidence.otel.encoder import SCOPE_NAME, make_resource
from proxy.evidence.otel.scrub import scrub_text
from proxy.evidence.record import DECISION_EVENT, Record


def sdk_provider(exporter: LogRecordExporter, version: str) -> LoggerProvider:
    provider = LoggerProvider(resource=make_resource(version), shutdown_on_exit=False)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    return provider


def sdk_emit(provider: LoggerProvider, version: str, record: Record) -> None:
    """What the sink would export for ``record``, through the SDK's logs API."""
    logger = provider.get_logger(SCOPE_NAME, version)
    attrs = attributes(record)
    kw: dict[str, Any] = {
        "timestamp": int(float(record["ts"]) * 1e9),
        "attributes": attrs,
        "severity_number": SeverityNumber.INFO,
        "severity_text": "INFO",
    }
    if record.get("event", DECISION_EVENT) == DECISION_EVENT:
        if not is_allow(record):
            kw["severity_number"], kw["severity_text"] = SeverityNumber.WARN, "WARN"
        logger.emit(body=decision_body(attrs), event_name=DECISION_EVENT, **kw)
    else:
        logger.emit(event_name=scrub_text(str(record["event"]), 64), **kw)
