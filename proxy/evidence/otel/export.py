"""OpenTelemetry log-record events for every decision, exported over OTLP without ever blocking the gate.

Each decision becomes an ``egress.decision`` event and each closed connection an
``egress.connection.closed`` event, sent by the SDK's own OTLP exporters (gRPC or HTTP/protobuf), so
endpoint, headers, TLS, compression and timeout come from the standard ``OTEL_EXPORTER_OTLP_*``
variables and the CLI flags.

The records are built as OTLP protobuf messages directly from the journal-shaped dicts
(:class:`LogEncoder`), not through the SDK's logs API: ``Logger.emit``, the SDK ``LogRecord`` with its
attribute cleaning and then ``encode_logs`` cost about 100 us per event, building the messages in place
about 10 us, and that CPU is what the export costs the host under load. The output is the same: the
resource (``Resource.create``, so ``OTEL_RESOURCE_ATTRIBUTES`` still applies), the instrumentation scope
(both encoded by the SDK's encoders), attribute limits (``OTEL_LOGRECORD_ATTRIBUTE_*``), timestamps,
severity, body and event name.

The SDK's ``BatchLogRecordProcessor`` drops a batch when the collector stays down longer than its retry
budget. An audit trail may not lose events silently, so the queue here is our own
(:class:`ReliableExporter`): a bounded queue and one export thread that keeps a failed batch and retries it
(backing off) until the collector accepts it.

With a journal configured, export runs in a separate process (``python -m proxy.evidence.otel.export``, started and
supervised by :class:`OtelSink`) that follows the journal file. A collector outage is then buffered *on
disk* in the journal itself (the follower stops reading while the queue is full), and the encoding runs
on another core instead of competing with the proxy's event loop for the GIL: the gate pays only the
journal write. An export cursor (``.FILE.otlp-cursor``, the last journal seq the collector accepted)
carries the backlog across restarts of either process: exactly once after a clean stop, at least once
after a crash (the cursor is written at most once a second). On the first start with a journal, older
history is not replayed. Decisions the journal failed to write, and everything when there is no journal,
are exported in-process from a bounded memory queue (past its bound, records are dropped and counted).
Export failures, retries, drops and queue depth are Prometheus metrics.

Secrets never leave the host: userinfo is stripped, query *values* are dropped (names kept), every string
is length-capped and control characters are escaped before a value becomes an attribute.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple
from typing import Protocol as TypingProtocol
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
    _encode_value,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.logs.v1.logs_pb2 import (
    SEVERITY_NUMBER_INFO,
    SEVERITY_NUMBER_WARN,
    SeverityNumber,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord as PbLogRecord
from opentelemetry.sdk._logs import LogRecordLimits
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from proxy.core.decision import Decision
from proxy.evidence.journal.writer import (
    DECISION_EVENT,
    Journal,
    JournalFollower,
    decision_fields,
    last_journaled,
    locate,
)
from proxy.evidence.metrics import OTLP_DROP_REASONS, Metrics

log = logging.getLogger(__name__)

CLOSED_EVENT = "egress.connection.closed"
SCOPE_NAME = "agent-egress"
Protocol = Literal["grpc", "http"]
Record = Mapping[
    str, Any
]  # a journal record, or the same shape for an event the journal did not write
MAX_TEXT = 256
MAX_PATH = 1024
DEFAULT_EXPORT_TIMEOUT = 5.0
STARTUP_TIMEOUT = 15.0
STAT_KEYS = ("exported", "failures", "retries", *(f"dropped_{r}" for r in OTLP_DROP_REASONS))
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}


# -- scrubbing --------------------------------------------------------------------------------------


def scrub_text(value: object, limit: int = MAX_TEXT) -> str:
    """Escape control characters (so a value cannot forge log lines) and cap the length."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text  # the common case, without building a new string
    text = text.translate(_CONTROL)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scrub_host(host: object) -> str:
    """A host as an attribute: any ``user:password@`` prefix removed."""
    text = str(host)
    return scrub_text(text.rpartition("@")[2], 255)


def scrub_query(query: str) -> str:
    """Query parameter names only: ``a=1&token=s3cr3t`` -> ``a=&token=``."""
    names = [part.partition("=")[0] for part in query.split("&") if part]
    return "&".join(f"{name}=" for name in names)


def scrub_url(target: str) -> tuple[str, str | None]:
    """(path, query-without-values) of a request target, absolute-form URLs included; userinfo and
    fragment dropped."""
    parts = urlsplit(target)
    query = scrub_query(parts.query) if parts.query else None
    if parts.scheme and parts.netloc:
        netloc = parts.netloc.rpartition("@")[2]
        path = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    else:
        path = parts.path
    return scrub_text(path, MAX_PATH), scrub_text(query, MAX_PATH) if query is not None else None


# -- attribute mapping ------------------------------------------------------------------------------

_PROTOCOL_NAME = {"connect": "http", "http": "http", "request": "http", "dns": "dns", "tls": "tls"}
_DIRECT = {  # decision field -> attribute name, for strings that need only scrub_text
    "decision": "egress.decision",
    "rule": "egress.rule",
    "reason": "egress.reason",
    "policy_version": "egress.policy.version",
    "sandbox_id": "egress.sandbox.id",
    "mode": "egress.mode",
    "address": "egress.resolved_address",
    "client": "client.address",
    "method": "http.request.method",
    "sni": "tls.client.server_name",
    "kind": "egress.kind",
    "qtype": "egress.dns.question.type",
    "detail": "egress.detail",
    "id": "egress.decision.id",
}


def decision_attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes of an ``egress.decision`` event from ``Decision.to_dict()`` or a journal record."""
    out: dict[str, Any] = {}
    for key, name in _DIRECT.items():
        value = fields.get(key)
        if value is not None:
            out[name] = scrub_text(value)
    kind = str(fields.get("kind", ""))
    host = fields.get("host")
    if host is not None:
        out["server.address"] = scrub_host(host)
        if kind == "dns":
            out["dns.question.name"] = out["server.address"]
    port = fields.get("port")
    if isinstance(port, int):
        out["server.port"] = port
    path = fields.get("path")
    if path is not None:
        out["url.path"], query = scrub_url(str(path))
        if query is not None:
            out["url.query"] = query
    if fields.get("query") is not None:  # recorded apart from the path (values already scrubbed)
        out["url.query"] = scrub_text(fields["query"], MAX_PATH)
    if kind in _PROTOCOL_NAME:
        out["network.protocol.name"] = _PROTOCOL_NAME[kind]
    if isinstance(fields.get("seq"), int):
        out["egress.journal.seq"] = fields["seq"]
    return out


def event_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes of other events (connection closed): already OTel-named by the caller; scrubbed here."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if key in ("event", "prev", "hash", "ts"):
            continue
        name = "egress.journal.seq" if key == "seq" else scrub_text(key, 64)
        if isinstance(value, bool | int | float):
            out[name] = value
        elif value is not None:
            out[name] = scrub_host(value) if name == "server.address" else scrub_text(value)
    return out


_INFO = (SEVERITY_NUMBER_INFO, "INFO")
_WARN = (SEVERITY_NUMBER_WARN, "WARN")


def _severity(verdict: object) -> tuple[SeverityNumber.ValueType, str]:
    return _INFO if str(verdict) == "allow" else _WARN


def _decision_body(attrs: Mapping[str, Any]) -> str:
    return (
        f"{attrs.get('egress.decision', '?')} {attrs.get('egress.kind', '?')} "
        f"{attrs.get('server.address', '?')}:{attrs.get('server.port', '-')} "
        f"({attrs.get('egress.reason', '?')})"
    )


# -- encoding ---------------------------------------------------------------------------------------


class Encoded(NamedTuple):
    request: ExportLogsServiceRequest
    records: int  # how many the request holds
    failed: int  # records left out because they could not be encoded (logged, counted as drops)


class LogEncoder:
    """Records (journal-shaped dicts) -> one OTLP ``ExportLogsServiceRequest`` per batch.

    Fills the protobuf messages in place: what the SDK would send for the same ``Logger.emit`` call,
    at a tenth of the CPU. The resource and scope are encoded once, by the SDK's own encoders.
    """

    def __init__(self, version: str) -> None:
        self.resource = make_resource(version)
        self.scope = InstrumentationScope(SCOPE_NAME, version)
        self._resource_pb = _encode_resource(self.resource)
        self._scope_pb = _encode_instrumentation_scope(self.scope)
        # OTEL_LOGRECORD_ATTRIBUTE_{COUNT,VALUE_LENGTH}_LIMIT and their fallbacks, read as the SDK does
        limits = LogRecordLimits()
        self.max_attributes: int | None = limits.max_log_record_attributes
        self.max_length: int | None = limits.max_log_record_attribute_length

    def encode(self, records: Sequence[Record]) -> Encoded:
        request = ExportLogsServiceRequest()
        resource_logs = request.resource_logs.add()
        resource_logs.resource.CopyFrom(self._resource_pb)
        if self.resource.schema_url:
            resource_logs.schema_url = self.resource.schema_url
        scope_logs = resource_logs.scope_logs.add()
        scope_logs.scope.CopyFrom(self._scope_pb)
        out = scope_logs.log_records
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
        if event == DECISION_EVENT:
            attrs = decision_attributes(record)
            msg.severity_number, msg.severity_text = _severity(record.get("decision"))
            msg.body.string_value = _decision_body(attrs)
            msg.event_name = DECISION_EVENT
        else:
            attrs = event_attributes(record)
            msg.severity_number, msg.severity_text = _INFO
            msg.body.SetInParent()  # the SDK sends an empty body value for a record without one
            msg.event_name = scrub_text(str(event), 64)
        msg.time_unix_nano = _ns(record.get("ts"))
        msg.observed_time_unix_nano = time.time_ns()
        self._attributes(msg, attrs)

    def _attributes(self, msg: PbLogRecord, attrs: dict[str, Any]) -> None:
        """As the SDK's ``BoundedAttributes`` then ``_encode_attributes``: past the count limit the
        oldest are dropped (and counted), strings are cut to the length limit, a value protobuf cannot
        take is logged and left out."""
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
                    kv.value.CopyFrom(_encode_value(value))
            except Exception:
                del msg.attributes[len(msg.attributes) - 1]
                log.exception("attribute %s could not be encoded", key)


# -- the export pipeline ----------------------------------------------------------------------------


class Transport(TypingProtocol):
    """Sends one prebuilt request; the SDK's OTLP exporters underneath (see :func:`make_exporter`)."""

    def send(self, request: ExportLogsServiceRequest, count: int) -> bool: ...

    def shutdown(self) -> None: ...


class ReliableExporter:
    """A record queue that never blocks the caller and never silently loses a record.

    ``offer`` (non-blocking) drops and counts when the queue is full; the journal follower checks
    ``room`` and then ``extend``s, so it stops reading instead. One thread encodes each batch once and
    sends it; a failed batch is kept and sent again after a capped exponential backoff, so a collector
    outage delays events but does not lose them.
    """

    def __init__(
        self,
        transport: Transport,
        encoder: LogEncoder,
        metrics: Metrics | None = None,
        *,
        max_queue: int = 8192,
        batch_size: int = 512,
        flush_interval: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.transport = transport
        self.encoder = encoder
        self.metrics = metrics
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_backoff = max_backoff
        self.backlog: Callable[[], int] = (
            _nothing  # records waiting elsewhere (the journal), for the depth gauge
        )
        self.on_exported: Callable[[Sequence[Record]], None] = _ignore
        self._queue: collections.deque[Record] = collections.deque()
        self._inflight: list[Record] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._last_drop_log = -1e9
        # plain totals beside the metrics: the export process reports these to the gate cheaply
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def count(self, key: str, n: int = 1) -> None:
        """Add to a total and to its Prometheus counter."""
        self.stats[key] += n
        m = self.metrics
        if m is None:
            return
        if key == "exported":
            m.otlp_exported.inc(n)
        elif key == "failures":
            m.otlp_export_failures.inc(n)
        elif key == "retries":
            m.otlp_retries.inc(n)
        else:
            m.otlp_dropped.labels(reason=key.removeprefix("dropped_")).inc(n)

    # queue
    def offer(self, record: Record) -> bool:
        with self._cond:
            if len(self._queue) >= self.max_queue or self._stop.is_set():
                reason = "shutdown" if self._stop.is_set() else "queue_full"
                self.count(f"dropped_{reason}")
                now = time.monotonic()
                if now - self._last_drop_log >= 10:  # counted every time, logged now and then
                    self._last_drop_log = now
                    log.error(
                        "OTLP export queue %s: events are being dropped (see "
                        "egress_otlp_dropped_records_total)",
                        reason.replace("_", " "),
                    )
                return False
            self._queue.append(record)
            if len(self._queue) >= self.batch_size:
                self._cond.notify_all()
        return True

    def extend(self, records: Sequence[Record]) -> None:
        """Queue records the caller made ``room`` for (the journal follower: they also stay on disk)."""
        if not records:
            return
        with self._cond:
            self._queue.extend(records)
            if len(self._queue) >= self.batch_size:
                self._cond.notify_all()

    def room(self) -> int:
        with self._cond:
            return self.max_queue - len(self._queue)

    def depth(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._inflight)

    def update_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.otlp_queue_depth.set(self.depth() + self.backlog())

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stop.is_set():
                    self._cond.wait(self.flush_interval)
                if not self._queue:
                    self._update_gauge_locked()
                    if self._stop.is_set():
                        return
                    continue
                count = min(self.batch_size, len(self._queue))
                self._inflight = [self._queue.popleft() for _ in range(count)]
                self._cond.notify_all()
            self._deliver(self._encode(self._inflight))

    def _update_gauge_locked(self) -> None:
        if self.metrics is not None:
            self.metrics.otlp_queue_depth.set(
                len(self._queue) + len(self._inflight) + self.backlog()
            )

    def _encode(self, batch: Sequence[Record]) -> Encoded | None:
        """Once per batch (retries resend the same request); None if nothing is left to send."""
        try:
            encoded = self.encoder.encode(batch)
        except Exception:  # an encoder bug must not kill the export thread
            log.exception("OTLP encoding of %d events failed", len(batch))
            self.count("dropped_encode", len(batch))
            return None
        if encoded.failed:
            self.count("dropped_encode", encoded.failed)
        return encoded if encoded.records else None

    def _deliver(self, encoded: Encoded | None) -> None:
        backoff = 0.1
        while True:
            self.update_gauge()
            try:
                ok = encoded is None or self.transport.send(encoded.request, encoded.records)
            except Exception:  # an exporter bug must not kill the export thread
                log.exception("OTLP exporter raised")
                ok = False
            if ok:
                if encoded is not None:
                    self.count("exported", encoded.records)
                try:
                    self.on_exported(self._inflight)
                except Exception:
                    log.exception("OTLP export cursor update failed")
                with self._cond:
                    self._inflight = []
                    self._cond.notify_all()
                self.update_gauge()
                return
            self.count("failures")
            if backoff >= self.max_backoff or backoff == 0.1:  # first failure, then at the cap
                log.warning(
                    "OTLP export of %d events failed; retrying every %.1fs at most",
                    len(self._inflight),
                    min(backoff * 2, self.max_backoff),
                )
            if self._stop.is_set():
                if self._abandon():
                    return
                time.sleep(min(backoff, 0.2))
            else:
                self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
            self.count("retries")

    def _abandon(self) -> bool:
        """During close, stop retrying once the flush deadline passed; what is left is counted."""
        if time.monotonic() < self._deadline:
            return False
        with self._cond:
            left = [*self._inflight, *self._queue]
            self._inflight = []
            self._queue.clear()
            self._cond.notify_all()
        # records read from the journal stay there and are sent after the next start
        lost = sum(1 for rec in left if journal_seq(rec) is None)
        if lost:
            self.count("dropped_shutdown", lost)
        if left:
            log.error(
                "OTLP exporter shut down with %d events undelivered: %d kept in the journal for "
                "the next start, %d lost (counted)",
                len(left),
                len(left) - lost,
                lost,
            )
        return True

    _deadline = float("inf")

    def flush(self, timeout: float) -> bool:
        """Wait (bounded) until everything queued so far was exported."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._queue or self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> None:
        self._deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout + 1)
        self._abandon_remaining()
        try:
            self.transport.shutdown()
        except Exception:
            log.exception("OTLP exporter shutdown failed")

    def _abandon_remaining(self) -> None:
        self._deadline = 0.0
        self._abandon()


def _nothing() -> int:
    return 0


def _ignore(batch: Sequence[Record]) -> None:
    pass


def journal_seq(record: Record) -> int | None:
    seq = record.get("seq")
    return seq if isinstance(seq, int) else None


# -- configuration ----------------------------------------------------------------------------------


def resolve_endpoint(
    endpoint: str | None, protocol: str | None, env: Mapping[str, str] | None = None
) -> tuple[str, Protocol] | None:
    """(endpoint URL, protocol) from CLI values, falling back to the standard ``OTEL_EXPORTER_OTLP_*``
    variables; None when no endpoint is configured (export off).

    Protocol without a flag or variable: ``grpc`` for port 4317 (the collector's gRPC port), otherwise
    ``http`` (the OTLP specification's default, http/protobuf). For HTTP the generic endpoint is a base URL
    and ``/v1/logs`` is appended, as the specification requires; the ``_LOGS_`` variable is used as is.
    """
    env = os.environ if env is None else env
    signal_specific = False
    if endpoint is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT") or None
        signal_specific = endpoint is not None
    if endpoint is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
    if not endpoint:
        return None
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        log.warning("OTEL_SDK_DISABLED=true: OTLP export to %s is off", endpoint)
        return None
    raw = (
        protocol
        or env.get("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    )
    if raw is None:
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        raw = "grpc" if parts.port == 4317 else "http"
    chosen: Protocol
    if raw == "grpc":
        chosen = "grpc"
    elif raw in ("http", "http/protobuf"):
        chosen = "http"
    else:
        raise ValueError(f"--otlp-protocol must be grpc or http (http/protobuf), not {raw!r}")
    if chosen == "http" and not signal_specific:
        parts = urlsplit(endpoint)
        if not parts.path.rstrip("/").endswith("/v1/logs"):
            endpoint = urlunsplit(
                (parts.scheme, parts.netloc, parts.path.rstrip("/") + "/v1/logs", parts.query, "")
            )
    return endpoint, chosen


def make_exporter(endpoint: str, protocol: Protocol, timeout: float | None = None) -> Transport:
    """The SDK's own OTLP exporter, taking prebuilt requests; headers, TLS and compression come from
    the standard variables."""
    if timeout is None and not (
        os.environ.get("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    ):
        timeout = DEFAULT_EXPORT_TIMEOUT
    if protocol == "grpc":
        return _grpc_transport(endpoint, timeout)
    return _http_transport(endpoint, timeout)


class _Prebuilt(NamedTuple):
    request: ExportLogsServiceRequest
    records: int


def _grpc_transport(endpoint: str, timeout: float | None) -> Transport:
    """The SDK's gRPC log exporter with its batch translation (``encode_logs``) replaced by the request
    built here; channel, credentials, headers, compression and its retries stay the SDK's."""
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.exporter import OTLPExporterMixin
    from opentelemetry.sdk._logs.export import LogRecordExportResult

    class GrpcTransport(OTLPLogExporter):
        def _translate_data(self, data: Any) -> ExportLogsServiceRequest:
            prebuilt: _Prebuilt = data
            return prebuilt.request

        def _count_data(self, data: Any) -> int:
            prebuilt: _Prebuilt = data
            return prebuilt.records

        def send(self, request: ExportLogsServiceRequest, count: int) -> bool:
            batch: Any = _Prebuilt(request, count)
            result = OTLPExporterMixin._export(self, batch)
            return result is LogRecordExportResult.SUCCESS

    insecure = True if urlsplit(endpoint).scheme == "http" else None
    return GrpcTransport(endpoint=endpoint, insecure=insecure, timeout=timeout)


def _http_transport(endpoint: str, timeout: float | None) -> Transport:
    """The SDK's HTTP/protobuf log exporter sending a prebuilt request: its ``export`` minus the
    ``encode_logs(batch)`` line (SDK 1.45), through its own client (session, TLS, headers,
    compression, retries) and its own size limit and self-metrics."""
    from opentelemetry.exporter.otlp.proto.http._common import (
        RequestPayloadTooLargeError,
        _is_request_too_large,
    )
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    class HttpTransport(OTLPLogExporter):
        def send(self, request: ExportLogsServiceRequest, count: int) -> bool:
            if self._shutdown:
                log.warning("OTLP exporter already shut down, batch not sent")
                return False
            with self._metrics.export_operation(count) as result:
                data = request.SerializeToString()
                if _is_request_too_large(data, self._max_request_size):
                    log.error(
                        "OTLP request of %d bytes exceeds the exporter's max_request_size %d",
                        len(data),
                        self._max_request_size,
                    )
                    result.error = RequestPayloadTooLargeError(
                        f"Serialized logs request size {len(data)} bytes exceeds "
                        f"max_request_size {self._max_request_size} bytes."
                    )
                    return False
                outcome = self._client.export(data)
                if not outcome.success:
                    result.error = outcome.error
                    if outcome.status_code is not None:
                        result.error_attrs = {"http.response.status_code": outcome.status_code}
                    return False
            return True

    transport = HttpTransport(endpoint=endpoint, timeout=timeout)
    for name in ("_client", "_metrics", "_max_request_size", "_shutdown"):
        if not hasattr(transport, name):  # fail at start-up, not silently at the first export
            raise RuntimeError(
                f"opentelemetry-exporter-otlp-proto-http has no OTLPLogExporter.{name}: "
                "proxy/otel.py's HttpTransport needs updating for this version"
            )
    return transport


def make_resource(version: str) -> Resource:
    return Resource.create(
        {
            "service.name": "agent-egress",
            "service.version": version,
            "host.name": socket.gethostname(),
        }
    )


# -- the sink ---------------------------------------------------------------------------------------


def cursor_path(journal_path: Path) -> Path:
    """Hidden, so ``egress audit verify FILE*`` globs never pick it up."""
    return journal_path.with_name(f".{journal_path.name}.otlp-cursor")


def read_cursor(path: Path) -> int | None:
    """The last journal seq the collector accepted; None before the first export with this journal."""
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("OTLP export cursor %s unreadable, starting at the end: %s", path, exc)
        return None


def write_cursor(path: Path, seq: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(f"{seq}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("OTLP export cursor %s not written: %s", path, exc)


class JournalExporter:
    """Exports the records appended to a journal file, from the record after ``after_seq`` on.

    Runs in the export process (see :class:`OtelSink`). The follower stops reading while the export
    queue is full, so a collector outage is buffered in the journal on disk, not in memory. The cursor
    file is rewritten at most once a second and on close: exactly once across clean restarts, at least
    once across crashes.
    """

    def __init__(
        self,
        path: Path,
        transport: Transport,
        *,
        after_seq: int,
        version: str = "0",
        metrics: Metrics | None = None,
        cursor: Path | None = None,
        max_queue: int = 8192,
        batch_size: int = 512,
        flush_interval: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.cursor = cursor if cursor is not None else cursor_path(path)
        self.exported_seq = after_seq
        self._after_seq = after_seq
        self._cursor_written = 0.0
        self.processor = ReliableExporter(
            transport,
            LogEncoder(version),
            metrics,
            max_queue=max_queue,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_backoff=max_backoff,
        )
        self.processor.on_exported = self._exported
        self.follower = follow_after(path, after_seq)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="otlp-journal", daemon=True)
        self._thread.start()

    def _exported(self, batch: Sequence[Record]) -> None:
        seq = max((s for s in map(journal_seq, batch) if s is not None), default=None)
        if seq is not None:
            self.exported_seq = seq
            if time.monotonic() - self._cursor_written >= 1.0:
                write_cursor(self.cursor, self.exported_seq)
                self._cursor_written = time.monotonic()

    def _follow(self) -> None:
        last_error = 0.0
        while not self._stop.is_set():
            room = self.processor.room()
            try:
                records = self.follower.read(limit=min(room, 512)) if room > 0 else []
            except OSError as exc:  # the journal's own errors are counted by the journal
                if time.monotonic() - last_error > 30:
                    log.error("OTLP export cannot read the journal %s: %s", self.path, exc)
                    last_error = time.monotonic()
                self._stop.wait(0.5)
                continue
            after = self._after_seq
            self.processor.extend(
                [rec for rec in records if isinstance(seq := rec.get("seq"), int) and seq > after]
            )
            if not records:
                self._stop.wait(0.05)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is on disk now (bounded by ``timeout``), then stop and write the cursor."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.processor.depth() > 0:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout)
        self.follower.close()
        self.processor.close(max(0.1, deadline - time.monotonic()))
        write_cursor(self.cursor, self.exported_seq)


def follow_after(path: Path, after_seq: int) -> JournalFollower:
    """A follower that will hand out every record with a seq above ``after_seq`` (it may also hand out
    a few at or below it, which the caller skips), across rotations and without a gap."""
    try:
        fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        fd = None
    size = os.fstat(fd).st_size if fd is not None else 0
    found = locate(path, after_seq)  # after the fstat: a record it misses was appended after `size`
    if found is not None:
        if fd is not None:
            os.close(fd)
        return JournalFollower(path, offset=found[1], seq=after_seq, start=found[0])
    return JournalFollower(path, offset=size, seq=after_seq, fd=fd)


class _ExportProcess:
    """Parent side of the export process: starts it, restarts it if it dies, mirrors its counters
    into the gate's metrics, and knows which journal seq the collector has."""

    def __init__(
        self,
        journal: Journal,
        target: tuple[str, Protocol],
        *,
        timeout: float | None,
        version: str,
        metrics: Metrics | None,
        tuning: Mapping[str, float],
    ) -> None:
        self.journal = journal
        self.target = target
        self.timeout = timeout
        self.version = version
        self.metrics = metrics
        self.tuning = dict(tuning)
        self.cursor = cursor_path(journal.path)
        after = read_cursor(self.cursor)
        if after is None or after > journal.seq:  # first export, or a new journal: no replay
            after = journal.seq
        self.exported_seq = after
        self._last: dict[str, float] = {}
        self._proc: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()
        self.on_status: Callable[[], None] = _nothing_to_do
        self.ready = threading.Event()
        self._start_child()
        self._thread = threading.Thread(target=self._supervise, name="otlp-process", daemon=True)
        self._thread.start()
        # Start-up (imports, connecting) happens before the gate says it is ready, not under load.
        if not self.ready.wait(STARTUP_TIMEOUT):
            log.error("OTLP export process not ready after %.0f s; events wait in the journal",
                      STARTUP_TIMEOUT)  # fmt: skip

    def _start_child(self) -> None:
        cursor = read_cursor(self.cursor)
        after = max(self.exported_seq, cursor if cursor is not None else 0)
        cmd = [
            sys.executable, "-m", "proxy.evidence.otel.export",
            "--journal", str(self.journal.path),
            "--endpoint", self.target[0],
            "--protocol", self.target[1],
            "--after-seq", str(after),
            "--version", self.version,
        ]  # fmt: skip
        if self.timeout is not None:
            cmd += ["--timeout", str(self.timeout)]
        for key, value in self.tuning.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._last = {}
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def _supervise(self) -> None:
        while True:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            for line in proc.stdout:
                try:
                    self._apply(json.loads(line))
                except (ValueError, TypeError):
                    log.error("OTLP export process said: %s", line.strip()[:200])
            proc.wait()
            if self._stopping.is_set():
                return
            log.error("OTLP export process exited (%s); restarting it in 1 s", proc.returncode)
            if self._stopping.wait(1.0):
                return
            try:
                self._start_child()
            except OSError:
                log.exception("OTLP export process cannot be started")
                return

    def _apply(self, status: dict[str, Any]) -> None:
        self.ready.set()
        seq = status.get("exported_seq")
        if isinstance(seq, int) and seq > self.exported_seq:
            self.exported_seq = seq
        if self.metrics is not None:
            m = self.metrics
            for key, counter in (
                ("exported", m.otlp_exported),
                ("failures", m.otlp_export_failures),
                ("retries", m.otlp_retries),
            ):
                self._mirror(key, status, counter.inc)
            for reason in OTLP_DROP_REASONS:
                self._mirror(f"dropped_{reason}", status, m.otlp_dropped.labels(reason=reason).inc)
        self.on_status()

    def _mirror(self, key: str, status: Mapping[str, Any], inc: Callable[[float], None]) -> None:
        value = float(status.get(key, 0))
        delta = value - self._last.get(key, 0.0)
        if delta > 0:
            inc(delta)
        self._last[key] = value

    def backlog(self) -> int:
        return max(0, self.journal.seq - self.exported_seq)

    def flush(self, timeout: float) -> bool:
        target = self.journal.seq
        deadline = time.monotonic() + timeout
        while self.exported_seq < target:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self, timeout: float) -> None:
        """The process sends what is pending (bounded), writes the cursor and exits."""
        self._stopping.set()
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(f"close {timeout:.3f}\n")
                proc.stdin.flush()
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: flush (bounded by timeout) and exit
        try:
            proc.wait(timeout + 5)
        except subprocess.TimeoutExpired:
            log.error("OTLP export process did not stop; killing pid %d", proc.pid)
            proc.kill()
            proc.wait(5)
        self._thread.join(5)


def _nothing_to_do() -> None:
    pass


class OtelSink:
    """Emitter sink turning decisions and connection-closed events into OTel log records.

    With a journal, the export runs in a separate process (``python -m proxy.evidence.otel.export``) that follows the
    journal file: the gate's own cost per decision is then just the journal write, and the exporter's
    CPU (about 20 us per event: JSON parsing, scrubbing, protobuf encoding, sending) does not compete
    with the proxy for the GIL. Anything the journal failed to write is exported in-process, so a full
    disk does not also silence the telemetry. Without a journal everything is exported in-process from
    a bounded memory queue; the gate's event loop then pays only for queueing a dict, the encoding
    runs on the export thread.
    """

    def __init__(
        self,
        target: tuple[str, Protocol],
        *,
        timeout: float | None = None,
        version: str = "0",
        metrics: Metrics | None = None,
        journal: Journal | None = None,
        max_queue: int = 8192,
        batch_size: int = 512,
        flush_interval: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.metrics = metrics
        self.journal = journal
        self.processor = ReliableExporter(
            make_exporter(*target, timeout=timeout),
            LogEncoder(version),
            metrics,
            max_queue=max_queue,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_backoff=max_backoff,
        )
        self._closed = False
        self.process: _ExportProcess | None = None
        if journal is not None:
            self.process = _ExportProcess(
                journal,
                target,
                timeout=timeout,
                version=version,
                metrics=metrics,
                tuning={
                    "max_queue": max_queue,
                    "batch_size": batch_size,
                    "flush_interval": flush_interval,
                    "max_backoff": max_backoff,
                },
            )
            self.processor.backlog = self.process.backlog
            self.process.on_status = self.processor.update_gauge

    # sink protocol
    def record(self, decision: Decision) -> None:
        if self.journal is not None and last_journaled() is decision:
            return  # the export process sends it from the journal
        self.processor.offer(decision_fields(decision))

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        if self.journal is not None and last_journaled() is attributes:
            return
        self.processor.offer({"ts": time.time(), **attributes, "event": name})

    def flush(self, timeout: float = 5.0) -> bool:
        """Bounded wait until everything recorded so far (journal backlog included) was exported."""
        deadline = time.monotonic() + timeout
        if self.process is not None and not self.process.flush(timeout):
            return False
        return self.processor.flush(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is pending (bounded by ``timeout``), then stop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        if self.process is not None:
            self.process.close(max(0.1, deadline - time.monotonic()))
        self.processor.close(max(0.1, deadline - time.monotonic()))


# -- the export process -----------------------------------------------------------------------------


def _status(exporter: JournalExporter) -> dict[str, Any]:
    return {"exported_seq": exporter.exported_seq, **exporter.processor.stats}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m proxy.evidence.otel.export``: the export process. Reports progress as JSON lines on stdout and
    stops (flushing, bounded) when stdin closes, i.e. when the gate closes it or dies."""
    parser = argparse.ArgumentParser(prog="python -m proxy.evidence.otel.export")
    parser.add_argument("--journal", required=True, type=Path)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--protocol", required=True, choices=("grpc", "http"))
    parser.add_argument("--after-seq", required=True, type=int)
    parser.add_argument("--version", default="0")
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--max-queue", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--flush-interval", type=float, default=0.2)
    parser.add_argument("--max-backoff", type=float, default=5.0)
    parser.add_argument("--close-timeout", type=float, default=5.0)
    parser.add_argument("--nice", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="agent-egress otlp export: %(message)s")
    # Export may lag, proxying may not: on a busy host the scheduler serves the gate first and this
    # process catches up from the journal when there is CPU to spare (queue depth shows the lag).
    with contextlib.suppress(OSError):
        os.nice(args.nice)
    exporter = JournalExporter(
        args.journal,
        make_exporter(args.endpoint, args.protocol, timeout=args.timeout),
        after_seq=args.after_seq,
        version=args.version,
        metrics=None,  # totals go to the gate as JSON; its registry has the metrics
        max_queue=args.max_queue,
        batch_size=int(args.batch_size),
        flush_interval=args.flush_interval,
        max_backoff=args.max_backoff,
    )
    done = threading.Event()
    out_lock = threading.Lock()

    def report() -> None:
        with out_lock:
            sys.stdout.write(json.dumps(_status(exporter)) + "\n")
            sys.stdout.flush()

    def reporter() -> None:
        last: dict[str, Any] = {}
        while not done.wait(0.1):
            status = _status(exporter)
            if status != last:
                report()
                last = status

    report()  # the first line tells the gate the export process is up
    thread = threading.Thread(target=reporter, name="otlp-status", daemon=True)
    thread.start()
    close_timeout = float(args.close_timeout)
    with contextlib.suppress(KeyboardInterrupt):
        for line in sys.stdin:  # until EOF; the gate may first say how long closing may take
            if line.startswith("close "):
                with contextlib.suppress(ValueError):
                    close_timeout = float(line.split()[1])
    exporter.close(close_timeout)
    done.set()
    thread.join(2)
    with contextlib.suppress(BrokenPipeError):
        report()
    return 0


def _ns(ts: object) -> int:
    seconds = float(ts) if isinstance(ts, (int, float)) else time.time()
    return int(seconds * 1e9)


if __name__ == "__main__":
    sys.exit(main())
