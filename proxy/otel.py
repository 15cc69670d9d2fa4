"""OpenTelemetry log-record events for every decision, exported over OTLP without ever blocking the gate.

Each decision becomes an ``egress.decision`` event and each closed connection an
``egress.connection.closed`` event, emitted through the SDK's logs API (``LoggerProvider`` /
``Logger.emit``) and sent by the SDK's OTLP exporters (gRPC or HTTP/protobuf).

The SDK's ``BatchLogRecordProcessor`` drops a batch when the collector stays down longer than its retry
budget. An audit trail may not lose events silently, so the processor here is our own: a bounded queue and
one export thread that keeps a failed batch and retries it (backing off) until the collector accepts it.
With a journal configured the queue is fed by a follower that reads the journal file, so a collector outage
is buffered *on disk* (bounded by the journal's own size and rotation), not in memory: the follower simply
stops reading while the queue is full. Without a journal the queue itself is the bound (records past it are
dropped and counted). Export failures, retries, drops and queue depth are Prometheus metrics.

Secrets never leave the host: userinfo is stripped, query *values* are dropped (names kept), every string
is length-capped and control characters are escaped before a value becomes an attribute.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import (
    LoggerProvider,
    LogRecordProcessor,
    ReadableLogRecord,
    ReadWriteLogRecord,
)
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource

from proxy.decision import Decision
from proxy.journal import (
    DECISION_EVENT,
    Journal,
    JournalFollower,
    decision_fields,
    last_journaled,
)
from proxy.metrics import Metrics

log = logging.getLogger(__name__)

CLOSED_EVENT = "egress.connection.closed"
Protocol = Literal["grpc", "http"]
MAX_TEXT = 256
MAX_PATH = 1024
DEFAULT_EXPORT_TIMEOUT = 5.0
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

_PROTOCOL_NAME = {"connect": "http", "http": "http", "dns": "dns", "tls": "tls"}
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


def _severity(verdict: object) -> tuple[SeverityNumber, str]:
    if str(verdict) == "allow":
        return SeverityNumber.INFO, "INFO"
    return SeverityNumber.WARN, "WARN"


# -- the export pipeline ----------------------------------------------------------------------------


class ReliableExporter(LogRecordProcessor):
    """A log record processor that never blocks the caller and never silently loses a record.

    ``offer`` (non-blocking) drops and counts when the queue is full; ``put`` (used by the journal
    follower) waits for room instead. One thread exports batches; a failed batch is kept and sent again
    after a capped exponential backoff, so a collector outage delays events but does not lose them.
    """

    def __init__(
        self,
        exporter: LogRecordExporter,
        metrics: Metrics | None = None,
        *,
        max_queue: int = 8192,
        batch_size: int = 512,
        flush_interval: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.exporter = exporter
        self.metrics = metrics
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_backoff = max_backoff
        self.backlog: Callable[[], int] = (
            _nothing  # records waiting elsewhere (the journal), for the depth gauge
        )
        self._queue: collections.deque[ReadableLogRecord] = collections.deque()
        self._inflight: list[ReadableLogRecord] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    # LogRecordProcessor
    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        self.offer(_readable(log_record))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        self.close()

    # queue
    def offer(self, record: ReadableLogRecord) -> bool:
        with self._cond:
            if len(self._queue) >= self.max_queue or self._stop.is_set():
                reason = "shutdown" if self._stop.is_set() else "queue_full"
                if self.metrics is not None:
                    self.metrics.otlp_dropped.labels(reason=reason).inc()
                log.error("OTLP export queue %s: event dropped (counted)", reason.replace("_", " "))
                return False
            self._queue.append(record)
            if len(self._queue) >= self.batch_size:
                self._cond.notify_all()
        return True

    def room(self) -> int:
        with self._cond:
            return self.max_queue - len(self._queue)

    def depth(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._inflight)

    def _update_gauge(self) -> None:
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
            self._deliver()

    def _update_gauge_locked(self) -> None:
        if self.metrics is not None:
            self.metrics.otlp_queue_depth.set(
                len(self._queue) + len(self._inflight) + self.backlog()
            )

    def _deliver(self) -> None:
        backoff = 0.1
        while True:
            self._update_gauge()
            try:
                result = self.exporter.export(self._inflight)
            except Exception:  # an exporter bug must not kill the export thread
                log.exception("OTLP exporter raised")
                result = LogRecordExportResult.FAILURE
            if result is LogRecordExportResult.SUCCESS:
                if self.metrics is not None:
                    self.metrics.otlp_exported.inc(len(self._inflight))
                with self._cond:
                    self._inflight = []
                    self._cond.notify_all()
                self._update_gauge()
                return
            if self.metrics is not None:
                self.metrics.otlp_export_failures.inc()
            with self._cond:
                self._inflight = []
                self._cond.notify_all()
            return
            log.warning(
                "OTLP export of %d events failed; retrying in %.1fs", len(self._inflight), backoff
            )
            if self._stop.is_set():
                if self._abandon():
                    return
                time.sleep(min(backoff, 0.2))
            else:
                self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)
            if self.metrics is not None:
                self.metrics.otlp_retries.inc()

    def _abandon(self) -> bool:
        """During close, stop retrying once the flush deadline passed; what is left is counted."""
        if time.monotonic() < self._deadline:
            return False
        with self._cond:
            lost = len(self._inflight) + len(self._queue)
            self._inflight = []
            self._queue.clear()
            self._cond.notify_all()
        if lost and self.metrics is not None:
            self.metrics.otlp_dropped.labels(reason="shutdown").inc(lost)
        if lost:
            log.error("OTLP exporter shut down with %d events undelivered (counted)", lost)
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
            self.exporter.shutdown()  # type: ignore[no-untyped-call]
        except Exception:
            log.exception("OTLP exporter shutdown failed")

    def _abandon_remaining(self) -> None:
        self._deadline = 0.0
        self._abandon()


def _nothing() -> int:
    return 0


def _readable(record: ReadWriteLogRecord) -> ReadableLogRecord:
    return ReadableLogRecord(
        log_record=record.log_record,
        resource=record.resource if record.resource is not None else Resource.create({}),
        instrumentation_scope=record.instrumentation_scope,
        limits=record.limits,
    )


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


def make_exporter(
    endpoint: str, protocol: Protocol, timeout: float | None = None
) -> LogRecordExporter:
    """The SDK's own OTLP exporter; headers, TLS and compression come from the standard variables."""
    if timeout is None and not (
        os.environ.get("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    ):
        timeout = DEFAULT_EXPORT_TIMEOUT
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
            OTLPLogExporter as GrpcExporter,
        )

        insecure = True if urlsplit(endpoint).scheme == "http" else None
        exporter: LogRecordExporter = GrpcExporter(
            endpoint=endpoint, insecure=insecure, timeout=timeout
        )
        return exporter
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HttpExporter

    exporter = HttpExporter(endpoint=endpoint, timeout=timeout)
    return exporter


def make_resource(version: str) -> Resource:
    return Resource.create(
        {
            "service.name": "agent-egress",
            "service.version": version,
            "host.name": socket.gethostname(),
        }
    )


# -- the sink ---------------------------------------------------------------------------------------


class OtelSink:
    """Emitter sink turning decisions and connection-closed events into OTel log records.

    With a journal, records the journal wrote are exported by a follower reading the journal file (so a
    collector outage is buffered on disk); anything the journal failed to write is emitted directly, so
    a full disk does not also silence the telemetry.
    """

    def __init__(
        self,
        exporter: LogRecordExporter,
        *,
        version: str = "0",
        metrics: Metrics | None = None,
        journal: Journal | None = None,
        max_queue: int = 8192,
        batch_size: int = 512,
        flush_interval: float = 0.2,
        max_backoff: float = 5.0,
    ) -> None:
        self.metrics = metrics
        self.processor = ReliableExporter(
            exporter,
            metrics,
            max_queue=max_queue,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_backoff=max_backoff,
        )
        self.provider = LoggerProvider(resource=make_resource(version), shutdown_on_exit=False)
        self.provider.add_log_record_processor(self.processor)
        self.logger = self.provider.get_logger("agent-egress", version)
        self.journal = journal
        self._follower: JournalFollower | None = None
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        if journal is not None:
            self._follower = journal.follow()
            self.processor.backlog = self._journal_backlog
            self._thread = threading.Thread(target=self._follow, name="otlp-journal", daemon=True)
            self._thread.start()

    # sink protocol
    def record(self, decision: Decision) -> None:
        if self.journal is not None and last_journaled() is decision:
            return  # the journal follower exports it from disk
        self._emit_decision(decision_fields(decision))

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        if self.journal is not None and last_journaled() is attributes:
            return
        self._emit_event(name, attributes, time.time())

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is pending (bounded by ``timeout``), then stop; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._follower is not None:
            self._follower.close()
        self.processor.close(max(0.1, deadline - time.monotonic()))

    def flush(self, timeout: float = 5.0) -> bool:
        """Bounded wait until everything recorded so far (journal backlog included) was exported."""
        deadline = time.monotonic() + timeout
        while self._journal_backlog() > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return self.processor.flush(max(0.0, deadline - time.monotonic()))

    # emission
    def _emit_decision(self, fields: Mapping[str, Any]) -> None:
        severity, text = _severity(fields.get("decision"))
        attrs = decision_attributes(fields)
        body = (
            f"{attrs.get('egress.decision', '?')} {attrs.get('egress.kind', '?')} "
            f"{attrs.get('server.address', '?')}:{attrs.get('server.port', '-')} "
            f"({attrs.get('egress.reason', '?')})"
        )
        self.logger.emit(
            timestamp=_ns(fields.get("ts")),
            severity_number=severity,
            severity_text=text,
            body=body,
            attributes=attrs,
            event_name=DECISION_EVENT,
        )

    def _emit_event(self, name: str, attributes: Mapping[str, Any], ts: object) -> None:
        self.logger.emit(
            timestamp=_ns(ts),
            severity_number=SeverityNumber.INFO,
            severity_text="INFO",
            attributes=event_attributes(attributes),
            event_name=scrub_text(name, 64),
        )

    # journal follower
    def _journal_backlog(self) -> int:
        if self.journal is None or self._follower is None:
            return 0
        return max(0, self.journal.seq - self._follower.seq)

    def _follow(self) -> None:
        assert self._follower is not None
        last_error = 0.0
        while not self._stop.is_set():
            room = self.processor.room()
            try:
                records = self._follower.read(limit=min(room, 512)) if room > 0 else []
            except OSError as exc:  # the journal's own errors are counted by the journal
                if time.monotonic() - last_error > 30:
                    log.error(
                        "OTLP export cannot read the journal %s: %s", self._follower.path, exc
                    )
                    last_error = time.monotonic()
                self._stop.wait(0.5)
                continue
            for rec in records:
                try:
                    if rec.get("event", DECISION_EVENT) == DECISION_EVENT:
                        self._emit_decision(rec)
                    else:
                        self._emit_event(str(rec["event"]), rec, rec.get("ts"))
                except Exception:
                    if self.metrics is not None:
                        self.metrics.otlp_dropped.labels(reason="encode").inc()
                    log.exception("journal record seq %s could not become an event", rec.get("seq"))
            if not records:
                self._stop.wait(0.05)


def _ns(ts: object) -> int:
    seconds = float(ts) if isinstance(ts, int | float) else time.time()
    return int(seconds * 1e9)
