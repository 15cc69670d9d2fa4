"""``python -m proxy.evidence.otel``: the export process the gate starts when it keeps a journal
(:mod:`proxy.evidence.otel.supervisor`).

It runs at a lower priority: export may lag, proxying may not. On a busy host the scheduler serves the
gate first and this process catches up from the journal when there is CPU to spare (queue depth shows
the lag).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.evidence.otel.journal_export import JournalExporter
from proxy.evidence.otel.settings import ExporterSettings, QueueLimits
from proxy.evidence.otel.transport import make_transport


def _status(exporter: JournalExporter) -> dict[str, Any]:
    return {"exported_seq": exporter.exported_seq, **exporter.processor.stats}


def main(argv: Sequence[str] | None = None) -> int:
    """Reports progress as JSON lines on stdout and stops (flushing, bounded) when stdin closes, i.e.
    when the gate closes it or dies."""
    parser = argparse.ArgumentParser(prog="python -m proxy.evidence.otel")
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
    parser.add_argument("--max-request-bytes", type=int, default=4_000_000)
    parser.add_argument("--close-timeout", type=float, default=5.0)
    parser.add_argument("--nice", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="agent-egress otlp export: %(message)s")
    with contextlib.suppress(OSError):
        os.nice(args.nice)
    settings = ExporterSettings.from_env(timeout=args.timeout)
    exporter = JournalExporter(
        args.journal,
        make_transport(args.endpoint, args.protocol, settings, args.version),
        after_seq=args.after_seq,
        version=args.version,
        metrics=None,  # totals go to the gate as JSON; its registry has the metrics
        limits=QueueLimits(
            args.max_queue,
            args.batch_size,
            args.flush_interval,
            args.max_backoff,
            args.max_request_bytes,
        ),
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


if __name__ == "__main__":
    sys.exit(main())
