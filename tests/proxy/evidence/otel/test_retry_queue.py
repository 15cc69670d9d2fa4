"""The retry queue's own logic, with a transport that fails on command (the sink tests use real
collectors): a failed batch is sent again until it is taken, once; what cannot be kept is counted."""

from __future__ import annotations

import threading

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from proxy.evidence.metrics import Metrics
from proxy.evidence.otel.encoder import LogEncoder
from proxy.evidence.otel.retry_queue import ReliableExporter
from proxy.evidence.otel.settings import QueueLimits
from proxy.evidence.otel.transport import ExportFailed
from proxy.evidence.record import decision_record
from tests.proxy.evidence.decisions import allow

FAST = QueueLimits(max_queue=10, batch_size=4, flush_interval=0.01, max_backoff=0.05)


class FlakyCollector:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def send(self, payload: bytes) -> int:
        request = ExportLogsServiceRequest.FromString(payload)
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                raise ExportFailed("collector down")
            for rec in request.resource_logs[0].scope_logs[0].log_records:
                attrs = {kv.key: kv.value.string_value for kv in rec.attributes}
                self.ids.append(attrs["egress.decision.id"])
        return 0

    def shutdown(self) -> None:
        pass


def test_a_failed_batch_is_retried_until_taken_and_sent_once() -> None:
    metrics = Metrics()
    collector = FlakyCollector(failures=3)
    queue = ReliableExporter(collector, LogEncoder("1"), metrics, FAST)
    sent = [allow(i) for i in range(6)]
    for d in sent:
        assert queue.offer(decision_record(d))
    assert queue.flush(10)
    queue.close(1)
    assert collector.ids == [d.id for d in sent]
    assert queue.stats["failures"] == 3 and queue.stats["retries"] == 3
    assert queue.stats["exported"] == 6
    assert metrics.otlp_retries._value.get() == 3


def test_past_its_bound_the_queue_drops_and_counts() -> None:
    collector = FlakyCollector(failures=10**6)  # never takes anything
    queue = ReliableExporter(collector, LogEncoder("1"), None, FAST)
    accepted = sum(queue.offer(decision_record(allow(i))) for i in range(40))
    queue.close(0.2)
    dropped = queue.stats["dropped_queue_full"] + queue.stats["dropped_shutdown"]
    assert accepted < 40
    assert queue.stats["dropped_queue_full"] == 40 - accepted
    assert dropped == 40  # what was accepted but never delivered is counted at shutdown
    assert collector.ids == []


def test_records_from_the_journal_are_not_counted_lost_at_shutdown() -> None:
    queue = ReliableExporter(FlakyCollector(failures=10**6), LogEncoder("1"), None, FAST)
    queue.extend([{**decision_record(allow(i)), "seq": i + 1} for i in range(5)])
    queue.close(0.2)
    assert queue.stats["dropped_shutdown"] == 0  # they stay in the journal for the next start
