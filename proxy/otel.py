"""OpenTelemetry log-record events for every decision, exported over OTLP without ever blocking the gate.

Each decision becomes an ``egress.decision`` event and each closed connection an
``egress.connection.closed`` event, emitted through the SDK's logs API (``LoggerProvider`` /
``Logger.emit``) and sent by the SDK's OTLP exporters (gRPC or HTTP/protobuf).

The SDK's ``BatchLogRecordProcessor`` drops a batch when the collector stays down longer than its retry
budget. An audit trail may not lose events silently, so the processor here is our own
(:class:`ReliableExporter`): a bounded queue and one export thread that keeps a failed batch and retries it
(backing off) until the collector accepts it.

With a journal configured, export runs in a separate process (``python -m proxy.otel``, started and
supervised by :class:`OtelSink`) that follows the journal file. A collector outage is then buffered *on
disk* in the journal itself (the follower stops reading while the queue is full), and the SDK's encoding
(tens of microseconds per event) runs on another core instead of competing with the proxy's event loop for
the GIL: the gate pays only the journal write. An export cursor (``.FILE.otlp-cursor``, the last journal seq
the collector accepted) carries the backlog across restarts of either process: exactly once after a clean
stop, at least once after a crash (the cursor is written at most once a second). On the first start with a
journal, older history is not replayed. Decisions the journal failed to write, and everything when there is
no journal, are exported in-process from a bounded memory queue (past its bound, records are dropped and
counted). Export failures, retries, drops and queue depth are Prometheus metrics.

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
    locate,
)
from proxy.metrics import OTLP_DROP_REASONS, Metrics

log = logging.getLogger(__name__)

CLOSED_EVENT = "egress.connection.closed"
Protocol = Literal["grpc", "http"]
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
        self.on_exported: Callable[[Sequence[ReadableLogRecord]], None] = _ignore
        self._queue: collections.deque[ReadableLogRecord] = collections.deque()
        self._inflight: list[ReadableLogRecord] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._last_drop_log = -1e9
        # plain totals beside the metrics: the export process reports these to the gate cheaply
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    # LogRecordProcessor
    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        self.offer(_readable(log_record))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.flush(timeout_millis / 1000)

    def shutdown(self) -> None:
        self.close()

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
    def offer(self, record: ReadableLogRecord) -> bool:
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
            self._deliver()

    def _update_gauge_locked(self) -> None:
        if self.metrics is not None:
            self.metrics.otlp_queue_depth.set(
                len(self._queue) + len(self._inflight) + self.backlog()
            )

    def _deliver(self) -> None:
        backoff = 0.1
        while True:
            self.update_gauge()
            try:
                result = self.exporter.export(self._inflight)
            except Exception:  # an exporter bug must not kill the export thread
                log.exception("OTLP exporter raised")
                result = LogRecordExportResult.FAILURE
            if result is LogRecordExportResult.SUCCESS:
                self.count("exported", len(self._inflight))
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
            self.exporter.shutdown()  # type: ignore[no-untyped-call]
        except Exception:
            log.exception("OTLP exporter shutdown failed")

    def _abandon_remaining(self) -> None:
        self._deadline = 0.0
        self._abandon()


def _nothing() -> int:
    return 0


def _ignore(batch: Sequence[ReadableLogRecord]) -> None:
    pass


def journal_seq(record: ReadableLogRecord) -> int | None:
    attributes = record.log_record.attributes or {}
    seq = attributes.get("egress.journal.seq")
    return seq if isinstance(seq, int) else None


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


class _Events:
    """Decision fields and event attributes -> SDK log records, through the logs API."""

    def __init__(self, processor: ReliableExporter, version: str) -> None:
        self.provider = LoggerProvider(resource=make_resource(version), shutdown_on_exit=False)
        self.provider.add_log_record_processor(processor)
        self.logger = self.provider.get_logger("agent-egress", version)

    def decision(self, fields: Mapping[str, Any]) -> None:
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

    def event(self, name: str, attributes: Mapping[str, Any], ts: object) -> None:
        self.logger.emit(
            timestamp=_ns(ts),
            severity_number=SeverityNumber.INFO,
            severity_text="INFO",
            attributes=event_attributes(attributes),
            event_name=scrub_text(name, 64),
        )

    def journal_record(self, record: Mapping[str, Any]) -> None:
        if record.get("event", DECISION_EVENT) == DECISION_EVENT:
            self.decision(record)
        else:
            self.event(str(record["event"]), record, record.get("ts"))


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
        exporter: LogRecordExporter,
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
            exporter,
            metrics,
            max_queue=max_queue,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_backoff=max_backoff,
        )
        self.processor.on_exported = self._exported
        self.events = _Events(self.processor, version)
        self.follower = follow_after(path, after_seq)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="otlp-journal", daemon=True)
        self._thread.start()

    def _exported(self, batch: Sequence[ReadableLogRecord]) -> None:
        seqs = [seq for seq in map(journal_seq, batch) if seq is not None]
        if seqs:
            self.exported_seq = max(seqs)
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
            for rec in records:
                if not isinstance(rec.get("seq"), int) or rec["seq"] <= self._after_seq:
                    continue
                try:
                    self.events.journal_record(rec)
                except Exception:
                    self.processor.count("dropped_encode")
                    log.exception("journal record seq %s could not become an event", rec.get("seq"))
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
            sys.executable, "-m", "proxy.otel",
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
        root = str(Path(__file__).resolve().parents[1])
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

    With a journal, the export runs in a separate process (``python -m proxy.otel``) that follows the
    journal file: the gate's own cost per decision is then just the journal write, and the exporter's
    CPU (the SDK's protobuf encoding costs tens of microseconds per event) does not compete with the
    proxy for the GIL. Anything the journal failed to write is emitted in-process, so a full disk does
    not also silence the telemetry. Without a journal everything is exported in-process from a bounded
    memory queue.
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
            metrics,
            max_queue=max_queue,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_backoff=max_backoff,
        )
        self.events = _Events(self.processor, version)
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
        self.events.decision(decision_fields(decision))

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        if self.journal is not None and last_journaled() is attributes:
            return
        self.events.event(name, attributes, time.time())

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
    """``python -m proxy.otel``: the export process. Reports progress as JSON lines on stdout and
    stops (flushing, bounded) when stdin closes, i.e. when the gate closes it or dies."""
    parser = argparse.ArgumentParser(prog="python -m proxy.otel")
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
    seconds = float(ts) if isinstance(ts, int | float) else time.time()
    return int(seconds * 1e9)


if __name__ == "__main__":
    sys.exit(main())
