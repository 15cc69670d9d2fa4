"""Soak: many sequential CONNECTs (half allowed, half refused) through a real ``egress serve`` with the
audit journal on, watching the gate's memory and file descriptors and counting the journal.

It answers three questions a long-running gate must get right: does memory grow with the number of
connections served (RSS sampled every 10 % of the run), does any connection leak a descriptor
(``/proc/<pid>/fd`` before and after), and is every decision in the journal exactly once (decision
records counted across the journal's rotated files against the requests sent, ids unique). ``python -m bench.soak [N]``; the suite runs a
small N in tests/test_soak.py, ``make bench`` a large one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._serve import start_serve, stop_serve
from proxy.evidence.journal.files import journal_files

ALLOWED, REFUSED = "allowed.test", "refused.test"


@dataclass
class SoakResult:
    connections: int
    seconds: float
    rss_kib: list[tuple[int, int]] = field(default_factory=list)  # (connections so far, VmRSS KiB)
    fds_before: int = 0
    fds_after: int = 0
    decisions: int = 0
    unique_ids: int = 0
    allowed: int = 0
    refused: int = 0
    wrong_answers: int = 0

    @property
    def growth_per_10k_kib(self) -> float:
        """RSS growth per 10,000 connections between the first and last sample (after warm-up)."""
        if len(self.rss_kib) < 2:
            return 0.0
        (n0, r0), (n1, r1) = self.rss_kib[0], self.rss_kib[-1]
        return (r1 - r0) * 10_000 / max(n1 - n0, 1)

    def table(self) -> str:
        rows = [
            ("connections (half allowed, half refused)", f"{self.connections:,}"),
            ("wall time", f"{self.seconds:.1f} s ({self.connections / self.seconds:,.0f}/s)"),
            ("RSS first / last sample", f"{self.rss_kib[0][1]:,} / {self.rss_kib[-1][1]:,} KiB"),
            ("RSS growth per 10,000 connections", f"{self.growth_per_10k_kib:,.0f} KiB"),
            ("file descriptors before / after", f"{self.fds_before} / {self.fds_after}"),
            ("decisions journaled / unique ids", f"{self.decisions:,} / {self.unique_ids:,}"),
            ("answers other than 200 / 403", f"{self.wrong_answers}"),
        ]
        return "\n".join(["| soak | value |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connect(port: int, host: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return head[:12]


def _settle(pid: int, baseline: int, seconds: float = 5.0) -> int:
    """Descriptors once the last connections are closed by the gate (bounded wait)."""
    deadline = time.monotonic() + seconds
    count = _fds(pid)
    while count > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
        count = _fds(pid)
    return count


def soak(connections: int, directory: Path) -> SoakResult:
    policy = directory / "policy.yaml"
    policy.write_text(
        f"version: 1\nrules:\n  - name: allowed\n    hosts: [{ALLOWED}]\n    ports: [443]\n"
    )
    hosts = directory / "hosts"
    hosts.write_text(f"203.0.113.9 {ALLOWED}\n203.0.113.9 {REFUSED}\n")
    journal = directory / "audit.jsonl"
    proc, port = start_serve(
        policy,
        "--hosts-file", str(hosts),
        "--nameserver", "127.0.0.1:9",
        "--journal", str(journal),
        "--no-metrics",
        "--decision-log", os.devnull,
        "--max-new-connections-per-second", "0",
    )  # fmt: skip
    result = SoakResult(connections=connections, seconds=0.0)
    try:
        for warm in range(200):  # caches and allocator arenas settle before the first sample
            _connect(port, ALLOWED if warm % 2 == 0 else REFUSED)
        result.fds_before = _settle(proc.pid, 0, 0.5)
        every = max(connections // 10, 1)
        started = time.monotonic()
        for n in range(connections):
            allowed = n % 2 == 0
            head = _connect(port, ALLOWED if allowed else REFUSED)
            expected = b"HTTP/1.1 200" if allowed else b"HTTP/1.1 403"
            if head != expected:
                result.wrong_answers += 1
            if n % every == 0:
                result.rss_kib.append((n, _status(proc.pid, "VmRSS")))
        result.seconds = time.monotonic() - started
        result.rss_kib.append((connections, _status(proc.pid, "VmRSS")))
        result.fds_after = _settle(proc.pid, result.fds_before)
    finally:
        stop_serve(proc)
    ids: set[str] = set()
    lines = (line for part in journal_files(journal) for line in part.read_text().splitlines())
    for line in lines:
        record = json.loads(line)
        if record.get("event") == "egress.decision":
            result.decisions += 1
            ids.add(record["id"])
            if record["decision"] == "allow":
                result.allowed += 1
            else:
                result.refused += 1
    result.unique_ids = len(ids)
    result.decisions -= 200  # the warm-up's
    result.allowed -= 100
    result.refused -= 100
    return result


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as directory:
        result = soak(count, Path(directory))
    print(result.table())
    ok = (
        result.decisions == count
        and result.unique_ids == count + 200
        and result.fds_after <= result.fds_before
        and result.wrong_answers == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
