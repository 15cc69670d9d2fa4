"""Records -> OTLP ``ExportLogsServiceRequest`` messages, built from the public ``opentelemetry-proto``
classes.

The records are not sent through the SDK's logs API: ``Logger.emit``, the SDK ``LogRecord`` with its
attribute cleaning and then its encoder cost about 100 us per event, filling the protobuf messages in
place about 10 us, and that CPU is what the export costs the host under load. The output is what the SDK
would send for the same ``Logger.emit`` call (a test compares the bytes): the resource
(``Resource.create``, so ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` apply), the
instrumentation scope, the attribute limits (``OTEL_LOGRECORD_ATTRIBUTE_*``, read as the specification
says), timestamps, severity, body and event name.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_INFO,
    SEVERITY_NUMBER_WARN,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as PbLogRecord
from opentelemetry.sdk.resources import Resource

from proxy.evidence.otel.attributes import attributes, decision_body, is_allow
from proxy.evidence.otel.scrub import scrub_text
from proxy.evidence.record import DECISION_EVENT, Record

log = logging.getLogger(__name__)

SCOPE_NAME = "agent-egress"
DEFAULT_ATTRIBUTE_COUNT_LIMIT = 128


class Encoded(NamedTuple):
    request: ExportLogsServiceRequest
    records: int  # how many the request holds
    failed: int  # records left out because they could not be encoded (logged, counted as drops)


def make_resource(version: str) -> Resource:
    return Resource.create(
        {
            "service.name": "agent-egress",
            "service.version": version,
            "host.name": socket.gethostname(),
        }
    )


def attribute_limits(env: Mapping[str, str] | None = None) -> tuple[int | None, int | None]:
    """(count, value length) limits of a log record's attributes; None is no limit. The log-record
    variables win over the general ones; an empty value means no limit."""
    env = os.environ if env is None else env
    count = _limit(env, "OTEL_ATTRIBUTE_COUNT_LIMIT", DEFAULT_ATTRIBUTE_COUNT_LIMIT)
    length = _limit(env, "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", None)
    return (
        _limit(env, "OTEL_LOGRECORD_ATTRIBUTE_COUNT_LIMIT", count),
        _limit(env, "OTEL_LOGRECORD_ATTRIBUTE_VALUE_LENGTH_LIMIT", length),
    )


def _limit(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    if name not in env:
        return default
    text = env[name].strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {text!r}")
    return value


def any_value(value: Any) -> AnyValue:
    """An attribute value as OTLP's ``AnyValue``; TypeError for a type it cannot hold."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        out = AnyValue()
        out.array_value.values.extend(any_value(v) for v in value)
        return out
    if isinstance(value, Mapping):
        out = AnyValue()
        out.kvlist_value.values.extend(
            KeyValue(key=str(k), value=any_value(v)) for k, v in value.items()
        )
        return out
    if value is None:
        return AnyValue()
    raise TypeError(f"an attribute cannot hold a {type(value).__name__}")


def _key_values(items: Mapping[str, Any]) -> list[KeyValue]:
    out = []
    for key, value in items.items():
        try:
            out.append(KeyValue(key=key, value=any_value(value)))
        except (TypeError, ValueError):
            log.exception("resource attribute %s could not be encoded", key)
    return out


class LogEncoder:
    """Records (journal-shaped dicts) -> one OTLP ``ExportLogsServiceRequest`` per batch.

    The resource and scope are encoded once; each record fills its message in place.
    """

    def __init__(self, version: str) -> None:
        self.resource = make_resource(version)
        self.version = version
        self._template = ExportLogsServiceRequest()
        resource_logs = self._template.resource_logs.add()
        resource_logs.resource.attributes.extend(_key_values(self.resource.attributes))
        if self.resource.schema_url:
            resource_logs.schema_url = self.resource.schema_url
        scope = resource_logs.scope_logs.add().scope
        scope.name = SCOPE_NAME
        scope.version = version
        self.max_attributes, self.max_length = attribute_limits()

    def encode(self, records: Sequence[Record]) -> Encoded:
        request = ExportLogsServiceRequest()
        request.CopyFrom(self._template)
        out = request.resource_logs[0].scope_logs[0].log_records
        failed = 0
        for record in records:
            try:
                self.fill(out.add(), record)
            except Exception:  # one bad record must not hold back (or retry forever) the batch
                del out[len(out) - 1]
                failed += 1
                log.exception("journal record seq %s could not become an event", record.get("seq"))
        return Encoded(request, len(out), failed)

    def fill(self, msg: PbLogRecord, record: Record) -> None:
        event = record.get("event", DECISION_EVENT)
        attrs = attributes(record)
        if event == DECISION_EVENT:
            if is_allow(record):
                msg.severity_number, msg.severity_text = SEVERITY_NUMBER_INFO, "INFO"
            else:
                msg.severity_number, msg.severity_text = SEVERITY_NUMBER_WARN, "WARN"
            msg.body.string_value = decision_body(attrs)
            msg.event_name = DECISION_EVENT
        else:
            msg.severity_number, msg.severity_text = SEVERITY_NUMBER_INFO, "INFO"
            msg.body.SetInParent()  # the SDK sends an empty body value for a record without one
            msg.event_name = scrub_text(event, 64)
        _trace_context(msg, record)
        msg.time_unix_nano = _ns(record.get("ts"))
        msg.observed_time_unix_nano = time.time_ns()
        self._attributes(msg, attrs)

    def _attributes(self, msg: PbLogRecord, attrs: dict[str, Any]) -> None:
        """As the SDK's bounded attributes then its encoder: past the count limit the oldest are
        dropped (and counted), strings are cut to the length limit, a value protobuf cannot take is
        logged and left out."""
        items: Any = attrs.items()
        given = len(attrs)
        if "" in attrs:  # the SDK refuses an empty key
            items = [(key, value) for key, value in items if key]
        maximum = self.max_attributes
        if maximum is not None and len(items) > maximum:
            items = list(items)[len(items) - maximum :] if maximum > 0 else []
        if len(items) < given:
            msg.dropped_attributes_count = given - len(items)
        limit = self.max_length
        add = msg.attributes.add
        for key, value in items:
            kv = add()
            kv.key = key
            cls = value.__class__
            try:
                if cls is str:
                    kv.value.string_value = value if limit is None else value[:limit]
                elif cls is int:
                    kv.value.int_value = value
                else:
                    if limit is not None and isinstance(value, str):
                        value = value[:limit]
                    kv.value.CopyFrom(any_value(value))
            except Exception:
                del msg.attributes[len(msg.attributes) - 1]
                log.exception("attribute %s could not be encoded", key)


def _ns(ts: object) -> int:
    seconds = float(ts) if isinstance(ts, int | float) else time.time()
    return int(seconds * 1e9)


def _trace_context(msg: PbLogRecord, record: Record) -> None:
    """A record caused inside an agent's trace carries its trace id and its own span id (the
    launcher's TRACEPARENT was validated on the way in; anything malformed here is left out)."""
    trace_id, span_id = record.get("trace_id"), record.get("span_id")
    if not (isinstance(trace_id, str) and isinstance(span_id, str)):
        return
    try:
        trace, span = bytes.fromhex(trace_id), bytes.fromhex(span_id)
    except ValueError:
        return
    if len(trace) == 16 and len(span) == 8:
        msg.trace_id, msg.span_id = trace, span
        msg.flags = 1  # sampled: the caller chose to trace this
