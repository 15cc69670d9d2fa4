"""The export queue: never blocks the gate, never silently loses a record.

The SDK's ``BatchLogRecordProcessor`` drops a batch when the collector stays down longer than its retry
budget. An audit trail may not lose events silently, so this queue keeps a failed batch and sends it
again (backing off) until the collector takes it. Records from the journal stay on disk while they wait;
records only held in memory are dropped past the queue's bound, and every drop is counted.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from proxy.evidence.otel.drops import OTLP_DROP_REASONS
from proxy.evidence.otel.settings import DEFAULT_LIMITS, QueueLimits
from proxy.evidence.otel.transport import ExportFailed, Transport
from proxy.evidence.record import Record

if TYPE_CHECKING:  # the export process has no registry: its totals go to the gate as JSON
    from proxy.evidence.metrics import Metrics
    from proxy.evidence.otel.encoder import Encoded, LogEncoder

log = logging.getLogger(__name__)

STAT_KEYS = ("exported", "failures", "retries", *(f"dropped_{r}" for r in OTLP_DROP_REASONS))


def journal_seq(record: Record) -> int | None:
    seq = record.get("seq")
    return seq if isinstance(seq, int) else None


class ReliableExporter:
    """A record queue that never blocks the caller and never silently loses a record.

    ``offer`` (non-blocking) drops and counts when the queue is full; the journal follower checks
    ``room`` and then ``extend``s, so it stops reading instead. One thread encodes each batch once and
    sends it; a failed batch is kept and sent again after a capped exponential backoff, so a collector
    outage delays events but does not lose them. A batch whose encoding exceeds ``max_request_bytes``
    is sent as several requests, in order: a collector refuses a message over its size limit on every
    retry, which would hold back every record after it for good.
    """

    def __init__(
        self,
        transport: Transport,
        encoder: LogEncoder,
        metrics: Metrics | None = None,
        limits: QueueLimits = DEFAULT_LIMITS,
    ) -> None:
        self.transport = transport
        self.encoder = encoder
        self.metrics = metrics
        self.max_queue = limits.max_queue
        self.batch_size = limits.batch_size
        self.flush_interval = limits.flush_interval
        self.max_backoff = limits.max_backoff
        self.max_request_bytes = limits.max_request_bytes
        self.backlog: Callable[[], int] = _nothing  # records waiting in the journal, for the gauge
        self.on_exported: Callable[[Sequence[Record]], None] = _ignore
        self._queue: collections.deque[Record] = collections.deque()
        self._inflight: list[Record] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._flushers = 0  # callers of flush() waiting: partial batches go out at once
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
                # A partial batch waits up to flush_interval for more (as the SDK's batch processor
                # does), also right after a send: under steady load each request then carries what
                # arrived in that interval instead of the few records that came during the last send.
                wait_until = time.monotonic() + self.flush_interval
                while (
                    len(self._queue) < self.batch_size
                    and not self._flushers
                    and not self._stop.is_set()
                ):
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._queue:
                    self._update_gauge_locked()
                    if self._stop.is_set():
                        return
                    continue
                count = min(self.batch_size, len(self._queue))
                self._inflight = [self._queue.popleft() for _ in range(count)]
                self._cond.notify_all()
            for part, encoded in self._parts(self._inflight):
                if not self._deliver(part, encoded):
                    break  # abandoned at shutdown: what is left was counted

    def _update_gauge_locked(self) -> None:
        if self.metrics is not None:
            self.metrics.otlp_queue_depth.set(
                len(self._queue) + len(self._inflight) + self.backlog()
            )

    def _parts(self, batch: list[Record]) -> list[tuple[list[Record], Encoded | None]]:
        """The batch as requests of at most ``max_request_bytes`` each (halved until they fit; a
        single record is sent as it is), in order, each encoded once (retries resend the same
        request). A part's request is None if nothing of it is left to send."""
        try:
            encoded = self.encoder.encode(batch)
        except Exception:  # an encoder bug must not kill the export thread
            log.exception("OTLP encoding of %d events failed", len(batch))
            self.count("dropped_encode", len(batch))
            return [(batch, None)]
        if len(encoded.payload) > self.max_request_bytes and len(batch) > 1:
            half = len(batch) // 2
            return [*self._parts(batch[:half]), *self._parts(batch[half:])]
        if encoded.failed:
            self.count("dropped_encode", encoded.failed)
        return [(batch, encoded if encoded.records else None)]

    def _deliver(self, part: list[Record], encoded: Encoded | None) -> bool:
        """Send one part of the batch in flight until the collector takes it; False if it was
        abandoned at shutdown (with the rest of the batch and the queue)."""
        backoff = 0.1
        while True:
            self.update_gauge()
            ok, why, rejected = True, "", 0
            try:
                if encoded is not None:
                    rejected = self.transport.send(encoded.payload)
            except ExportFailed as exc:
                ok, why = False, str(exc)
            except Exception:  # a transport bug must not kill the export thread
                log.exception("OTLP transport raised")
                ok, why = False, "transport error"
            if ok:
                if encoded is not None:
                    # what the collector took and then rejected is not sent again: counted lost
                    rejected = min(max(rejected, 0), encoded.records)
                    self.count("exported", encoded.records - rejected)
                    if rejected:
                        self.count("dropped_rejected", rejected)
                try:
                    self.on_exported(part)
                except Exception:
                    log.exception("OTLP export cursor update failed")
                with self._cond:
                    self._inflight = self._inflight[len(part) :]
                    self._cond.notify_all()
                self.update_gauge()
                return True
            self.count("failures")
            if backoff >= self.max_backoff or backoff == 0.1:  # first failure, then at the cap
                log.warning(
                    "OTLP export of %d events failed (%s); retrying every %.1fs at most",
                    len(part),
                    why,
                    min(backoff * 2, self.max_backoff),
                )
            if self._stop.is_set():
                if self._abandon():
                    return False
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
            self._flushers += 1  # no partial batch waits for more while someone waits for it
            self._cond.notify_all()
            try:
                while self._queue or self._inflight:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(min(remaining, 0.05))
            finally:
                self._flushers -= 1
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
