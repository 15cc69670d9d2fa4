"""Emitter decisions/s with all telemetry on vs off (the evidence path only, no proxy).

"off": the Emitter with the JSON decision log sink (to /dev/null), which the gate has anyway.
"on": that plus the write-ahead journal (fsync=interval, rotation at 64 MiB), Prometheus metrics and
OTLP/HTTP export to a real receiver running in a *separate process* on loopback (so its CPU does not count
against the gate's). With a journal the OTLP encoding itself also runs in the export process
(``python -m proxy.evidence.otel``), so what is measured here is what the gate's own event loop pays.

The target is new tunnels/s through the real proxy with telemetry on >= 0.9x off, which
``bench/tunnels.py`` measures through mitmproxy. This one isolates the per-decision cost of the
evidence sinks, so the printed overhead in microseconds can be compared with the proxy's per-tunnel cost
(roughly 1-2 ms on these machines): an overhead of 100 us per decision is a 0.9x-1.0x ratio there.
It also checks that every decision reached the collector exactly once, and reports the export process's
own CPU per decision (read from /proc): that is the CPU the host spends on OTLP besides the gate.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.evidence.emit import Emitter, JsonLineSink
from proxy.evidence.flags import add_evidence_arguments
from proxy.evidence.wiring import Evidence, EvidenceConfig, build_emitter

DECISIONS = 20_000
ROOT = Path(__file__).resolve().parents[1]


def _decision(i: int) -> Decision:
    return Decision(
        decision=Verdict.ALLOW if i % 4 else Verdict.DENY,
        reason=Reason.ALLOWED_BY_RULE if i % 4 else Reason.NO_MATCHING_RULE,
        rule="pypi" if i % 4 else None,
        kind=Kind.CONNECT,
        host=f"files{i % 50}.pythonhosted.org",
        port=443,
        policy_version="3f2a9c",
        mode="enforce",
        client="127.0.0.1",
        sandbox_id="sb-bench",
    )


def _rate(emitter: Emitter, decisions: list[Decision]) -> float:
    started = time.perf_counter()
    for d in decisions:
        emitter.emit(d)
    return len(decisions) / (time.perf_counter() - started)


def _cpu_seconds(pid: int) -> float | None:
    """User+system CPU of a running process, from /proc (Linux); None elsewhere or once it exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _export_pid(evidence: Evidence) -> int | None:
    process = evidence.otel.process if evidence.otel is not None else None
    proc = process._proc if process is not None else None
    return proc.pid if proc is not None else None


def main() -> int:
    decisions = [_decision(i) for i in range(DECISIONS)]
    devnull = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (closed by the sink)
    off = Emitter(sinks=[JsonLineSink(stream=devnull)])
    _rate(off, decisions[:2000])  # warm up
    off_rate = _rate(off, decisions)

    receiver = subprocess.Popen(
        [sys.executable, "-m", "tests.otlp_receiver", "http"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None and receiver.stdin is not None
        endpoint = receiver.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            parser = argparse.ArgumentParser()
            add_evidence_arguments(parser)
            args = parser.parse_args(
                ["--journal", str(Path(tmp) / "audit.jsonl"), "--audit-required",
                 "--otlp-endpoint", endpoint, "--otlp-protocol", "http", "--metrics", "127.0.0.1:0"]
            )  # fmt: skip
            config = EvidenceConfig.from_args(args, env={})
            evidence = build_emitter(config, [JsonLineSink(stream=devnull)])
            evidence.start()
            try:
                pid = _export_pid(evidence)
                cpu_before = _cpu_seconds(pid) if pid is not None else None
                on_rate = _rate(evidence.emitter, decisions)
                drain_started = time.perf_counter()
                assert evidence.otel is not None
                drained = evidence.otel.flush(60)
                drain = time.perf_counter() - drain_started
                cpu_after = _cpu_seconds(pid) if pid is not None else None
                if _export_pid(evidence) != pid:  # restarted meanwhile: the numbers mean nothing
                    cpu_before = cpu_after = None
            finally:
                evidence.close()
        receiver.stdin.close()
        received = int(receiver.stdout.readline().strip() or -1)
        receiver.wait(timeout=10)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(timeout=10)
    devnull.close()

    overhead_us = (1 / on_rate - 1 / off_rate) * 1e6
    print(f"emitter decisions/s, telemetry off (JSON log only):  {off_rate:12,.0f}")
    print(f"emitter decisions/s, telemetry on (journal+metrics+OTLP): {on_rate:9,.0f}")
    print(f"ratio on/off (emitter path only):                    {on_rate / off_rate:12.3f}")
    print(f"telemetry cost per decision:                         {overhead_us:10.1f} us")
    for tunnel_ms in (1.0, 2.0):
        projected = (tunnel_ms * 1000) / (tunnel_ms * 1000 + overhead_us)
        print(
            f"projected tunnels/s ratio at {tunnel_ms:.0f} ms/tunnel:              {projected:10.3f}"
        )
    print(
        f"OTLP backlog drained after the run in {drain:.2f} s; receiver got {received} of {DECISIONS}"
    )
    if cpu_before is not None and cpu_after is not None:
        export_us = (cpu_after - cpu_before) / DECISIONS * 1e6
        print(f"export process CPU per decision (journal -> OTLP/HTTP):  {export_us:10.1f} us")
    if not drained or received != DECISIONS:
        print("FAIL: not every decision reached the collector exactly once", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
