"""Records -> serialised OTLP ``ExportLogsServiceRequest`` messages.

The records are not sent through the SDK's logs API: ``Logger.emit``, the SDK ``LogRecord`` with its
attribute cleaning and then its encoder cost about 100 us per event; filling ``opentelemetry-proto``'s
messages in place about 16 us; writing the record's bytes with the repeating fields kept
(:mod:`proxy.evidence.otel.wire`) a few us, and that CPU is what the export costs the host under load.
The output is what the SDK would send for the same ``Logger.emit`` call (a test parses both and compares
them): the resource (``Resource.create``, so ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME``
apply), the instrumentation scope, the attribute limits (``OTEL_LOGRECORD_ATTRIBUTE_*``, read as the
specification says), timestamps, severity, body and event name.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_INFO,
    SEVERITY_NUMBER_WARN,
    ResourceLogs,
    ScopeLogs,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as PbLogRecord
from opentelemetry.sdk.resources import Resource

from proxy.evidence.otel import wire
from proxy.evidence.otel.attributes import attributes, decision_body, is_allow
from proxy.evidence.otel.scrub import scrub_text
from proxy.evidence.record import DECISION_EVENT, Record

log = logging.getLogger(__name__)

SCOPE_NAME = "agent-egress"
DEFAULT_ATTRIBUTE_COUNT_LIMIT = 128


class Encoded(NamedTuple):
    payload: bytes  # a serialised ExportLogsServiceRequest
    records: int  # how many the request holds
    failed: int  # records left out because they could not be encoded (logged, counted as drops)

    @property
    def request(self) -> ExportLogsServiceRequest:
        """The request parsed back, for tools and tests; the transports send :attr:`payload`."""
        request = ExportLogsServiceRequest()
        request.ParseFromString(self.payload)
        return request


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
    """Records (journal-shaped dicts) -> one serialised OTLP ``ExportLogsServiceRequest`` per batch.

    The resource and scope are serialised once by the library. Each record is written with
    :mod:`proxy.evidence.otel.wire`: the encoded attribute, severity and body fields that repeat
    from record to record are kept (a bounded cache, emptied when full) and joined.
    """

    CACHE = 4096  # entries of each cache; emptied whole when full, so unique values cost no scan

    def __init__(self, version: str) -> None:
        self.resource = make_resource(version)
        self.version = version
        resource_logs = ResourceLogs()
        resource_logs.resource.attributes.extend(_key_values(self.resource.attributes))
        if self.resource.schema_url:
            resource_logs.schema_url = self.resource.schema_url
        self._resource_logs = resource_logs.SerializeToString()
        self._scope_logs = ScopeLogs(
            scope=InstrumentationScope(name=SCOPE_NAME, version=version)
        ).SerializeToString()
        self.max_attributes, self.max_length = attribute_limits()
        self._attribute_fields: dict[tuple[str, str | int], bytes] = {}
        self._keys: dict[str, bytes] = {}
        self._heads: dict[tuple[int, str, str | None], bytes] = {}

    def encode(self, records: Sequence[Record]) -> Encoded:
        out: list[bytes] = [self._scope_logs]
        failed = 0
        for record in records:
            try:
                out.append(wire.length_delimited(_SCOPE_LOGS_RECORDS, self.log_record(record)))
            except Exception:  # one bad record must not hold back (or retry forever) the batch
                failed += 1
                log.exception("journal record seq %s could not become an event", record.get("seq"))
        resource_logs = self._resource_logs + wire.length_delimited(
            _RESOURCE_LOGS_SCOPE_LOGS, b"".join(out)
        )
        payload = wire.length_delimited(_REQUEST_RESOURCE_LOGS, resource_logs)
        return Encoded(payload, len(out) - 1, failed)

    def log_record(self, record: Record) -> bytes:
        """One serialised ``LogRecord``, as the SDK's logs API would send the record."""
        event = record.get("event", DECISION_EVENT)
        attrs = attributes(record)
        if event == DECISION_EVENT:
            severity = SEVERITY_NUMBER_INFO if is_allow(record) else SEVERITY_NUMBER_WARN
            head = self._head(severity, DECISION_EVENT, decision_body(attrs))
        else:  # the SDK sends an empty body value for a record without one
            head = self._head(SEVERITY_NUMBER_INFO, scrub_text(event, 64), None)
        parts = [wire.fixed64(_TIME, _ns(record.get("ts"))), head]
        self._attributes(parts, attrs)
        _trace_context(parts, record)
        parts.append(wire.fixed64(_OBSERVED_TIME, time.time_ns()))
        return b"".join(parts)

    def _head(self, severity: int, event_name: str, body: str | None) -> bytes:
        """Severity, body and event name, serialised by the library and kept while they repeat."""
        key = (severity, event_name, body)
        head = self._heads.get(key)
        if head is None:
            msg = PbLogRecord(
                severity_number=severity,  # type: ignore[arg-type]
                severity_text="INFO" if severity == SEVERITY_NUMBER_INFO else "WARN",
                event_name=event_name,
            )
            if body is None:
                msg.body.SetInParent()
            else:
                msg.body.string_value = body
            head = msg.SerializeToString()
            if len(self._heads) >= self.CACHE:
                self._heads.clear()
            self._heads[key] = head
        return head

    def _attributes(self, parts: list[bytes], attrs: dict[str, Any]) -> None:
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
        limit = self.max_length
        cache = self._attribute_fields
        for key, value in items:
            cls = value.__class__
            if cls is str and limit is not None:
                value = value[:limit]
            # str and int (exactly: not bool, whose True equals 1) share a cache keyed by value
            cached = cls is str or cls is int
            if cached:
                field = cache.get((key, value))
                if field is not None:
                    parts.append(field)
                    continue
            try:
                field = wire.length_delimited(_ATTRIBUTES, self._key_value(key, value, limit))
            except Exception:
                log.exception("attribute %s could not be encoded", key)
                continue
            if cached:
                if len(cache) >= self.CACHE:
                    cache.clear()
                cache[key, value] = field
            parts.append(field)
        if len(items) < given:
            parts.append(wire.varint_field(_DROPPED_ATTRIBUTES, given - len(items)))

    def _key_value(self, key: str, value: Any, limit: int | None) -> bytes:
        prefix = self._keys.get(key)
        if prefix is None:
            prefix = wire.key_prefix(key)
            if len(self._keys) >= self.CACHE:
                self._keys.clear()
            self._keys[key] = prefix
        cls = value.__class__
        if cls is str:
            return prefix + wire.string_value(value)  # (first: the common case)
        if cls is int:
            return prefix + wire.int_value(value)
        if cls is float:
            return prefix + wire.double_value(value)
        if cls is bool:
            return prefix + wire.bool_value(value)
        if limit is not None and isinstance(value, str):
            value = value[:limit]
        return bytes(KeyValue(key=key, value=any_value(value)).SerializeToString())


# field numbers (opentelemetry/proto/logs/v1/logs.proto, collector/logs/v1/logs_service.proto)
_REQUEST_RESOURCE_LOGS = 1  # ExportLogsServiceRequest.resource_logs
_RESOURCE_LOGS_SCOPE_LOGS = 2  # ResourceLogs.scope_logs
_SCOPE_LOGS_RECORDS = 2  # ScopeLogs.log_records
_TIME, _ATTRIBUTES, _DROPPED_ATTRIBUTES = 1, 6, 7  # LogRecord
_FLAGS, _TRACE_ID, _SPAN_ID, _OBSERVED_TIME = 8, 9, 10, 11


def _ns(ts: object) -> int:
    seconds = float(ts) if isinstance(ts, int | float) else time.time()
    return int(seconds * 1e9)


def _trace_context(parts: list[bytes], record: Record) -> None:
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
        parts.append(wire.fixed32(_FLAGS, 1))  # sampled: the caller chose to trace this
        parts.append(wire.length_delimited(_TRACE_ID, trace))
        parts.append(wire.length_delimited(_SPAN_ID, span))
