"""CPU per evidence record: ``Emitter.emit`` and the connection-closed event, with each set of sinks.

``python -m bench.evidence_emit [N]`` prints the process CPU time (``time.process_time``: user + sys,
so the writes' system calls count) per decision, per connection-closed event and per new TLS tunnel
(its three records: the CONNECT decision, the ClientHello decision, the closed event), for:

- ``default``: what ``egress serve`` records with no telemetry flags (the bench's rows): metrics, the
  decision log to /dev/null, the admin event feed and the reviewer's recent decisions;
- ``log``: the decision log to a file, alone;
- ``journal``: the audit journal (``--journal-fsync never``: the fsync thread's flushes are off the
  event loop and not what this measures), alone;
- ``full``: the bench's telemetry row: journal, decision log file, metrics, feed, recent decisions and
  an OTLP reader of the journal (which, the journal having recorded everything, does nothing more in
  the gate).

Records are built before the clock starts, so what is timed is the evidence alone. Best of
``ROUNDS`` rounds: the machine is shared and the minimum is the least disturbed figure.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proxy.approvals.admin import DecisionFeed
from proxy.approvals.reviewer import RecentDecisions
from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import Emitter, JsonLineSink, Sink
from proxy.evidence.journal.writer import Journal
from proxy.evidence.metrics import Metrics

ROUNDS = 5


class _JournalReader:
    """What the OTLP sink does in the gate when the journal recorded the record: nothing more."""

    def record_journaled(self, decision: Decision, journaled: bool) -> None:
        if journaled:
            return

    def event_journaled(self, name: str, attributes: dict[str, Any], journaled: bool) -> None:
        if journaled:
            return

    def close(self) -> None:
        pass


def _decisions(n: int) -> list[tuple[Decision, Decision]]:
    out = []
    for i in range(n):
        port = 40000 + i % 1000
        connect = Decision(
            decision=Verdict.ALLOW,
            reason=Reason.ALLOWED_BY_RULE,
            rule="bench",
            kind=Kind.CONNECT,
            host="registry.npmjs.org",
            port=443,
            policy_version="b2eafa82a88ddf39",
            mode="enforce",
            method="CONNECT",
            client=f"127.0.0.1:{port}",
            address="104.16.1.34",
            detail="registry.npmjs.org:443 allowed by rule 'bench'",
        )
        tls = connect.with_(kind=Kind.TLS, sni="registry.npmjs.org", method=None)
        out.append((connect, tls))
    return out


def _emitter(name: str, root: Path) -> Emitter:
    metrics = Metrics()
    journal: list[Sink] = []
    sinks: list[Sink] = [metrics]
    if name == "default":
        sinks += [JsonLineSink(path="/dev/null"), DecisionFeed(), RecentDecisions()]
    elif name == "log":
        sinks = [JsonLineSink(path=str(root / "decisions.jsonl"))]
    elif name == "journal":
        sinks = []
        journal = [Journal(root / "audit.jsonl", fsync="never")]
    elif name == "full":
        journal = [Journal(root / "audit.jsonl", fsync="never", metrics=metrics)]
        sinks += [
            JsonLineSink(path=str(root / "decisions.jsonl")),
            DecisionFeed(),
            RecentDecisions(),
            _JournalReader(),  # type: ignore[list-item]
        ]
    return Emitter(sinks, write_ahead=journal)


def measure(name: str, n: int) -> tuple[float, float, float]:
    """Best-of-rounds microseconds of CPU per (decision, closed event, tunnel)."""
    best = (float("inf"), float("inf"), float("inf"))
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as tmp:
            emitter = _emitter(name, Path(tmp))
            pairs = _decisions(n)
            try:
                start = time.process_time()
                for connect, tls in pairs:
                    emitter.emit(connect)
                    emitter.emit(tls)
                decided = time.process_time()
                for connect, _tls in pairs:
                    emitter.connection_closed(connect, bytes_out=812, bytes_in=40960, duration=0.25)
                closed = time.process_time()
            finally:
                emitter.close()
        per_decision = (decided - start) / (2 * n) * 1e6
        per_event = (closed - decided) / n * 1e6
        best = (
            min(best[0], per_decision),
            min(best[1], per_event),
            min(best[2], 2 * per_decision + per_event),
        )
    return best


def main(argv: list[str] | None = None) -> int:
    """``argv``: [N]; none when run by ``python -m bench evidence_emit`` (the default N)."""
    n = int(argv[0]) if argv else 20000
    print(f"CPU per record, µs (best of {ROUNDS} rounds of {n} tunnels)")
    print(f"{'sinks':<8} {'decision':>9} {'closed':>9} {'tunnel':>9}")
    for name in ("default", "log", "journal", "full"):
        decision, event, tunnel = measure(name, n)
        print(f"{name:<8} {decision:9.2f} {event:9.2f} {tunnel:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
